//! Phone numbers, in E.164, validated at the edge.
//!
//! A clinician's number is sensitive: it is what pages them, and it must not
//! end up in a log line or an error message. [`PhoneNumber`] therefore prints
//! (`Display` and `Debug`) with every digit but the last two masked, enough
//! for an operator to tell two numbers apart and nothing more; the one
//! caller that needs the digits, the SMS client, asks for them with
//! [`PhoneNumber::expose`]. Only the strict form is accepted (`+`, then the
//! digits, no spaces or punctuation): that is what the SMS provider takes,
//! and normalizing loose input here would mean guessing country codes.
//! [`PhoneError`] says what is wrong with a number, never what the number is.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Fewest digits accepted: below this no country's numbers are diallable.
pub const MIN_DIGITS: usize = 8;
/// Most digits E.164 allows, country code included.
pub const MAX_DIGITS: usize = 15;

/// What is wrong with a phone number. Carries no part of the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PhoneError {
    #[error("must start with + and the country code (E.164)")]
    NoPlus,
    #[error("must be digits only after the + (no spaces or punctuation)")]
    NotDigits,
    #[error("must have {MIN_DIGITS}-{MAX_DIGITS} digits after the +")]
    Length,
    #[error("cannot start with 0 after the + (country codes do not)")]
    LeadingZero,
}

/// An E.164 phone number: `+` then 8-15 digits, the first not 0.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// Validates `s`; the error never contains it.
    pub fn parse(s: &str) -> Result<PhoneNumber, PhoneError> {
        let digits = s.strip_prefix('+').ok_or(PhoneError::NoPlus)?;
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PhoneError::NotDigits);
        }
        if !(MIN_DIGITS..=MAX_DIGITS).contains(&digits.len()) {
            return Err(PhoneError::Length);
        }
        if digits.starts_with('0') {
            return Err(PhoneError::LeadingZero);
        }
        Ok(PhoneNumber(s.to_string()))
    }

    /// The whole number, for the SMS client. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for PhoneNumber {
    type Err = PhoneError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PhoneNumber::parse(s)
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Parsing guarantees `+` and at least 8 ASCII digits, so these
        // byte offsets are in range and on character boundaries.
        let digits = &self.0[1..];
        let (hidden, shown) = digits.split_at(digits.len() - 2);
        write!(f, "+{}{shown}", "*".repeat(hidden.len()))
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Result<&str, PhoneError>)] = &[
            ("+15555550101", Ok("+15555550101")),
            ("+447700900123", Ok("+447700900123")),
            ("+12345678", Ok("+12345678")), // 8 digits: the fewest
            ("+123456789012345", Ok("+123456789012345")), // 15: the most
            ("+1234567", Err(PhoneError::Length)),
            ("+1234567890123456", Err(PhoneError::Length)),
            ("+", Err(PhoneError::Length)),
            ("", Err(PhoneError::NoPlus)),
            ("15555550101", Err(PhoneError::NoPlus)),
            ("0015555550101", Err(PhoneError::NoPlus)),
            (" +15555550101", Err(PhoneError::NoPlus)),
            ("+15555550101 ", Err(PhoneError::NotDigits)),
            ("+1 555 555 0101", Err(PhoneError::NotDigits)),
            ("+1-555-555-0101", Err(PhoneError::NotDigits)),
            ("+1(555)5550101", Err(PhoneError::NotDigits)),
            ("++15555550101", Err(PhoneError::NotDigits)),
            ("+1555555010١", Err(PhoneError::NotDigits)), // Arabic-Indic digit
            ("+05555550101", Err(PhoneError::LeadingZero)),
        ];
        for (input, want) in cases {
            let got = PhoneNumber::parse(input);
            assert_eq!(
                got.as_ref().map(PhoneNumber::expose),
                want.as_ref().map(|s| *s),
                "{input:?}"
            );
        }
    }

    #[test]
    fn printing_masks_all_but_the_last_two_digits() {
        let cases: &[(&str, &str)] = &[
            ("+15555550142", "+*********42"),
            ("+12345678", "+******78"),
            ("+123456789012345", "+*************45"),
        ];
        for (number, shown) in cases {
            let p = PhoneNumber::parse(number).expect("valid");
            assert_eq!(p.to_string(), *shown);
            assert_eq!(format!("{p:?}"), format!("PhoneNumber({shown})"));
            assert_eq!(p.expose(), *number);
        }
    }

    #[test]
    fn errors_never_contain_the_number() {
        for bad in ["+1555555010x", "+1234", "+0555555010", "5555550101"] {
            let e = PhoneNumber::parse(bad).expect_err("invalid").to_string();
            assert!(!e.contains(&bad[bad.len() - 4..]), "{e:?} echoes {bad:?}");
        }
    }
}
