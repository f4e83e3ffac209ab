#!/usr/bin/env python3
"""An independent implementation of piivault's shaped tokens, for the
known-answer vectors in shaped_tokens.toml (src/format/shaped.rs is the
implementation under test; this shares no code with it).

FF1 is written from NIST SP 800-38G (rev. 1) and checked here against the
standard's own samples before any vector is written. Run:
    python3 tests/vectors/shaped_tokens.py > tests/vectors/shaped_tokens.toml
Needs the `cryptography` package (AES and HKDF).
"""

import math

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def aes(key, block):
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def num(xs, radix):
    n = 0
    for x in xs:
        n = n * radix + x
    return n


def stri(x, radix, m):
    out = [0] * m
    for i in range(m - 1, -1, -1):
        out[i] = x % radix
        x //= radix
    return out


def ff1(key, tweak, radix, xs, decrypt=False):
    n = len(xs)
    u, v = n // 2, n - n // 2
    a, b = xs[:u], xs[u:]
    t = len(tweak)
    bb = math.ceil(math.ceil(v * math.log2(radix)) / 8)
    d = 4 * math.ceil(bb / 4) + 4
    p = bytes([1, 2, 1]) + radix.to_bytes(3, "big") + bytes([10, u % 256]) + n.to_bytes(4, "big") + t.to_bytes(4, "big")

    def f(i, half):
        q = tweak + bytes((-t - bb - 1) % 16) + bytes([i]) + num(half, radix).to_bytes(bb, "big")
        r = bytes(16)
        msg = p + q
        for j in range(0, len(msg), 16):
            r = aes(key, bytes(x ^ y for x, y in zip(r, msg[j : j + 16])))
        s = r
        for j in range(1, math.ceil(d / 16)):
            s += aes(key, bytes(x ^ y for x, y in zip(r, j.to_bytes(16, "big"))))
        return int.from_bytes(s[:d], "big")

    if not decrypt:
        for i in range(10):
            m = u if i % 2 == 0 else v
            c = (num(a, radix) + f(i, b)) % radix**m
            a, b = b, stri(c, radix, m)
        return a + b
    for i in range(9, -1, -1):
        m = u if i % 2 == 0 else v
        c = (num(b, radix) - f(i, a)) % radix**m
        a, b = stri(c, radix, m), a
    return a + b


def check_nist_samples():
    k128 = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
    k256 = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3CEF4359D8D580AA4F7F036D6F04FC6A94")
    digits = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    tw = bytes.fromhex("39383736353433323130")
    samples = [
        (k128, b"", 10, digits, "2433477484"),
        (k128, tw, 10, digits, "6124200773"),
        (k256, b"", 10, digits, "6657667009"),
        (k256, tw, 10, digits, "1001623463"),
    ]
    for key, tweak, radix, xs, want in samples:
        got = "".join(str(x) for x in ff1(key, tweak, radix, xs))
        assert got == want, (got, want)
        assert ff1(key, tweak, radix, [int(c) for c in want], decrypt=True) == xs
    # Sample 9: radix 36 with a tweak.
    alpha = "0123456789abcdefghijklmnopqrstuvwxyz"
    xs = [alpha.index(c) for c in "0123456789abcdefghi"]
    tw9 = bytes.fromhex("3737373770717273373737")
    got = "".join(alpha[x] for x in ff1(k256, tw9, 36, xs))
    assert got == "xs8a0azh2avyalyzuwd", got


DIGITS = "0123456789"
LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
LOWER_ALNUM = LOWER + DIGITS
LABEL = b"piivault shaped token v1"
FF1_INFO = b"piivault token key: FF1 shaped tokens v1"


def luhn_ok(text):
    total = 0
    for i, c in enumerate(reversed([c for c in text if c.isdigit()])):
        d = int(c)
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def template(fmt, value):
    """(slots, luhn): a slot is ('fixed', ch), ('free', alphabet) or ('luhn',)."""
    kind = fmt["kind"]
    if kind == "email":
        local, domain = value.split("@")
        slots = [("free", LOWER_ALNUM)] * 16 + [("fixed", "@")]
        if fmt["keep_domain"]:
            slots += [("fixed", c) for c in domain]
        else:
            slots += [("free", LOWER_ALNUM)] * 12 + [("fixed", c) for c in ".invalid"]
        return slots, "any"
    if kind == "ssn":
        slots, seen = [], 0
        for c in value:
            if not c.isdigit():
                slots.append(("fixed", c))
                continue
            seen += 1
            slots.append(("fixed", "9") if seen == 1 else ("free", "01234") if seen == 4 else ("free", DIGITS))
        return slots, "any"
    keep_first = fmt.get("keep_first", 0)
    if kind == "digits" and fmt.get("keep_country_code") and value.startswith("+"):
        ds = [c for c in value[1:] if c.isdigit()][:2]
        two = "20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 60 61 62 63 64 65 66 81 82 84 86 90 91 92 93 94 95 98".split()
        keep_first = 1 if ds and ds[0] in "17" else 2 if "".join(ds) in two else 3
    keep_last = fmt.get("keep_last", 0)
    total = sum(c.isalnum() for c in value)
    slots, seen = [], 0
    for c in value:
        if not c.isalnum():
            slots.append(("fixed", c))
            continue
        seen += 1
        if seen <= keep_first or seen > total - keep_last:
            slots.append(("fixed", c))
        else:
            slots.append(("free", DIGITS if c.isdigit() else LOWER if c.islower() else UPPER))
    luhn = fmt.get("luhn", "any")
    if kind == "card" and luhn != "any":
        last = max(i for i, s in enumerate(slots) if s[0] == "free")
        slots[last] = ("luhn",)
    return slots, luhn


def token_kind(fmt):
    return {"card": "card:" + fmt.get("luhn", "any")}.get(fmt["kind"], fmt["kind"])


def shape_of(fmt, value):
    return 0 if fmt["kind"] == "email" else sum(c.isalnum() for c in value)


def domain_tweak(fmt, value, slots, luhn):
    n = 1
    tweak = LABEL + token_kind(fmt).encode() + b"\0" + shape_of(fmt, value).to_bytes(4, "big")
    for s in slots:
        if s[0] == "free":
            n *= len(s[1])
            tweak += bytes([len(s[1])])
        elif s[0] == "luhn":
            tweak += b"\0"
    if luhn == "invalid":
        n *= 9
    return n, tweak


def permute(key, tweak, domain, x, decrypt=False):
    bits = (domain - 1).bit_length()
    while True:
        xs = [(x >> (bits - 1 - i)) & 1 for i in range(bits)]
        x = num(ff1(key, tweak, 2, xs, decrypt), 2)
        if x < domain:
            return x


def passing(out, at):
    for d in range(10):
        out[at] = str(d)
        if luhn_ok(out):
            return d


def shaped_token(token_key, fmt, value, n):
    ff1_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=FF1_INFO).derive(token_key)
    slots, luhn = template(fmt, value)
    domain, tweak = domain_tweak(fmt, value, slots, luhn)
    x = permute(ff1_key, tweak, domain, n)
    out = [s[1] if s[0] == "fixed" else "0" for s in slots]
    choice = None
    if luhn == "invalid":
        choice, x = x % 9, x // 9
    for i in range(len(slots) - 1, -1, -1):
        if slots[i][0] == "free":
            alphabet = slots[i][1]
            out[i] = alphabet[x % len(alphabet)]
            x //= len(alphabet)
    for i, s in enumerate(slots):
        if s[0] == "luhn":
            p = passing(out, i)
            out[i] = str(p if choice is None else choice if choice < p else choice + 1)
    token = "".join(out)
    # Reading it back gives n again.
    assert permute(ff1_key, tweak, domain, read(slots, luhn, token), decrypt=True) == n
    return token


def read(slots, luhn, token):
    x, at = 0, None
    for s, c in zip(slots, token):
        if s[0] == "free":
            x = x * len(s[1]) + s[1].index(c)
        elif s[0] == "luhn":
            at = slots.index(s)
    if luhn == "invalid":
        out = list(token)
        p = passing(out, at)
        d = int(token[at])
        x = x * 9 + (d if d < p else d - 1)
    return x


CASES = [
    ({"kind": "digits", "keep_last": 0}, "078-05-1120", [1, 2, 999_999]),
    ({"kind": "digits", "keep_last": 4}, "+1 (202) 555-0143", [1, 77]),
    ({"kind": "digits", "keep_last": 0, "keep_country_code": True}, "+44 20 7946 0958", [1, 3]),
    ({"kind": "alphanumeric", "keep_last": 2}, "AB-123456-cd", [1, 123_456]),
    ({"kind": "card", "keep_first": 0, "keep_last": 4, "luhn": "invalid"}, "4111 1111 1111 1111", [1, 2, 89_999_999]),
    ({"kind": "card", "keep_first": 6, "keep_last": 0, "luhn": "valid"}, "5500-0000-0000-0004", [1, 5]),
    ({"kind": "card", "keep_first": 0, "keep_last": 0, "luhn": "any"}, "378282246310005", [1]),
    ({"kind": "ssn"}, "078-05-1120", [1, 49_999_999]),
    ({"kind": "ssn"}, "078051120", [1]),
    ({"kind": "email", "keep_domain": True}, "jane@example.org", [1, 2**40]),
    ({"kind": "email", "keep_domain": False}, "jane@example.org", [1]),
]


def main():
    check_nist_samples()
    key = bytes(range(32))
    print("# Known answers for shaped tokens (src/format/shaped.rs), written by")
    print("# tests/vectors/shaped_tokens.py, an independent implementation (FF1 from")
    print("# NIST SP 800-38G, checked against its samples). Token key 00 01 .. 1f.")
    print(f'token_key = "{key.hex()}"')
    for fmt, value, numbers in CASES:
        for n in numbers:
            print()
            print("[[case]]")
            for k, v in fmt.items():
                print(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, int) else chr(34) + v + chr(34)}")
            print(f'value = "{value}"')
            print(f"number = {n}")
            print(f'token = "{shaped_token(key, fmt, value, n)}"')


if __name__ == "__main__":
    main()
