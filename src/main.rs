//! The `piivault` command. Everything lives in [`piivault::cli`].

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    piivault::cli::main()
}
