//! [`PiiValue`]: a caller's personal data while it is in this process.

use zeroize::Zeroizing;

/// A value a caller wants protected (a card number, an email, a name).
///
/// Zeroized on drop. Implements neither `Debug`, `Display`, `Clone` nor
/// `Serialize`: the only way in is [`PiiValue::expose_secret`], so every use
/// of the clear value is one grep away.
pub struct PiiValue(Zeroizing<String>);

impl PiiValue {
    /// Takes ownership of a value.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The value in clear. Never log or format the result.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Length in bytes (UTF-8).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for PiiValue {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for PiiValue {
    fn from(value: &str) -> Self {
        Self::new(value.to_owned())
    }
}
