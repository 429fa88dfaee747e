//! The on-call roster: for each practice, who is paged when it has an
//! escalation, at any given moment.
//!
//! The roster is one TOML file (`roster.example.toml` at the repository root
//! is a commented example). Each `[[practice]]` gives its `id`, its IANA
//! `time_zone`, its clinicians, their weekly shifts and a `backup`:
//!
//! ```toml
//! [[practice]]
//! id = "practice-1"
//! time_zone = "America/New_York"
//! backup = "dr-lee"              # a clinician id of this practice
//!
//! [[practice.clinician]]
//! id = "dr-ortiz"                # 1-128 of A-Z a-z 0-9 . _ : -
//! name = "Dr. Ana Ortiz"
//! phone = "+15555550101"         # E.164
//!
//! [[practice.clinician]]
//! id = "dr-lee"
//! name = "Dr. Sam Lee"
//! phone = "+15555550102"
//!
//! [[practice.shift]]
//! clinician = "dr-ortiz"
//! days = ["mon", "tue", "wed", "thu", "fri"]
//! start = "08:00"                # HH:MM, the practice's wall clock
//! end = "18:00"                  # before start: the shift runs past midnight
//! ```
//!
//! Shifts are wall-clock times in the practice's zone, evaluated by turning
//! the instant asked about into the practice's local date and time, so a
//! shift keeps its hours across daylight-saving changes (and is an hour
//! shorter or longer on the night the clocks move). A shift covers
//! `start <= t < end`; one whose end is before its start runs past midnight
//! and belongs to the day it starts on, so a Friday 22:00-06:00 shift covers
//! Saturday 03:00. Where shifts overlap, the first listed wins. When no
//! shift covers the moment, nobody is on call and the backup is paged: the
//! backup is required, so every known practice always has someone to page.
//!
//! The file is walked as a plain TOML table rather than deserialized with
//! serde because serde's type errors quote the offending value, and the
//! values here include clinicians' names and phone numbers. Every error
//! names the file, the practice (by id once its id is valid, else by
//! position) and the field, and never a value. Validation stops at the first
//! error, as the service config's does.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use jiff::Timestamp;
use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use thiserror::Error;

use crate::ids::{ClinicianId, ID_MAX, PracticeId};
use crate::phone::{PhoneError, PhoneNumber};

/// Longest clinician name accepted, in characters.
pub const NAME_MAX: usize = 200;

/// A clinician who can be paged.
#[derive(Clone, PartialEq, Eq)]
pub struct Clinician {
    pub id: ClinicianId,
    /// Sensitive: print it only where an operator asked for it.
    pub name: String,
    pub phone: PhoneNumber,
}

// By hand so that `{:?}` on a roster or an `OnCall` cannot put a name in a
// log line; the phone number redacts itself.
impl fmt::Debug for Clinician {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clinician")
            .field("id", &self.id)
            .field("name", &"<redacted>")
            .field("phone", &self.phone)
            .finish()
    }
}

/// Who a practice's escalation pages at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnCall<'a> {
    /// The clinician whose shift covers the moment, if any.
    pub primary: Option<&'a Clinician>,
    pub backup: &'a Clinician,
}

impl<'a> OnCall<'a> {
    /// The one to page: the primary, or the backup when nobody is on call.
    pub fn paged(&self) -> &'a Clinician {
        self.primary.unwrap_or(self.backup)
    }
}

/// Days of the week a shift starts on, one bit per day from Monday.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Days(u8);

impl Days {
    fn bit(day: Weekday) -> u8 {
        1 << day.to_monday_zero_offset()
    }

    fn contains(self, day: Weekday) -> bool {
        self.0 & Days::bit(day) != 0
    }
}

#[derive(Debug, Clone)]
struct Shift {
    // A copy rather than an index into the practice's clinicians: a lookup
    // then has nothing that could be out of range.
    clinician: Clinician,
    days: Days,
    start: Time,
    end: Time,
}

impl Shift {
    fn covers(&self, day: Weekday, time: Time) -> bool {
        if self.start < self.end {
            self.days.contains(day) && self.start <= time && time < self.end
        } else {
            (self.days.contains(day) && self.start <= time)
                || (self.days.contains(day.previous()) && time < self.end)
        }
    }
}

#[derive(Debug, Clone)]
struct Practice {
    time_zone: TimeZone,
    shifts: Vec<Shift>,
    backup: Clinician,
}

/// Every practice's clinicians, shifts and backup, validated.
#[derive(Debug, Clone)]
pub struct Roster {
    practices: BTreeMap<String, Practice>,
}

/// Which practice an error is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PracticeRef {
    /// Its position among the `[[practice]]` tables, from 0, while its id
    /// is unknown or is the problem.
    Index(usize),
    Id(PracticeId),
}

impl fmt::Display for PracticeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PracticeRef::Index(i) => write!(f, "practice[{i}]"),
            PracticeRef::Id(id) => write!(f, "practice \"{id}\""),
        }
    }
}

/// What is wrong with a field. Never carries the field's value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Problem {
    #[error("is missing")]
    Missing,
    #[error("is not a roster key")]
    UnknownKey,
    #[error("must be a string")]
    NotString,
    #[error("must be an array of strings")]
    NotStrings,
    #[error("must be an array of tables ([[...]])")]
    NotTables,
    #[error("the roster has no [[practice]]")]
    NoPractices,
    #[error("a practice needs at least one [[practice.clinician]]")]
    NoClinicians,
    #[error("must be 1-{ID_MAX} characters of A-Z a-z 0-9 . _ : -")]
    BadId,
    #[error("is also the id of practice[{0}]")]
    DuplicatePractice(usize),
    #[error("is also the id of clinician[{0}]")]
    DuplicateClinician(usize),
    #[error("is not a time zone of the IANA database (such as America/New_York)")]
    UnknownTimeZone,
    #[error("must be 1-{NAME_MAX} characters, none of them control characters")]
    BadName,
    #[error("{0}")]
    Phone(PhoneError),
    #[error("names no clinician of this practice")]
    UnknownClinician,
    #[error("must list at least one day")]
    NoDays,
    #[error("must be one of mon, tue, wed, thu, fri, sat, sun")]
    BadDay,
    #[error("lists a day twice")]
    RepeatedDay,
    #[error("must be HH:MM, from 00:00 to 23:59")]
    BadTime,
    #[error("is the same as start; a shift needs a length (a 24-hour shift is two shifts)")]
    EndIsStart,
}

#[derive(Debug, Error)]
pub enum RosterError {
    #[error("reading roster file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML. The message is the parser's, which describes the syntax
    /// and never quotes the text.
    #[error("roster file {origin}, line {line}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        message: String,
    },
    /// A top-level problem: no practices, or a key that is not `practice`.
    #[error("roster file {origin}: {field}: {problem}")]
    File {
        origin: String,
        field: String,
        problem: Problem,
    },
    #[error("roster file {origin}: {practice}: {field}: {problem}")]
    Practice {
        origin: String,
        practice: PracticeRef,
        field: String,
        problem: Problem,
    },
}

impl Roster {
    /// Reads and validates the roster file at `path`.
    pub fn load(path: &Path) -> Result<Roster, RosterError> {
        let text = std::fs::read_to_string(path).map_err(|source| RosterError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Roster::parse(&text, &path.display().to_string())
    }

    /// Validates a roster's text; `origin` names it in errors (its path).
    pub fn parse(text: &str, origin: &str) -> Result<Roster, RosterError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let at = e.span().map_or(0, |s| s.start).min(text.len());
            RosterError::Syntax {
                origin: origin.to_string(),
                line: 1 + text.as_bytes()[..at]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count(),
                message: e.message().trim_end().to_string(),
            }
        })?;
        let file_error = |field: &str, problem| RosterError::File {
            origin: origin.to_string(),
            field: field.to_string(),
            problem,
        };
        if let Some(key) = table.keys().find(|k| *k != "practice") {
            return Err(file_error(key, Problem::UnknownKey));
        }
        let tables = tables(&table, "practice").map_err(|p| file_error("practice", p))?;
        if tables.is_empty() {
            return Err(file_error("practice", Problem::NoPractices));
        }
        let mut practices = BTreeMap::new();
        let mut first_index = BTreeMap::new();
        for (i, t) in tables.into_iter().enumerate() {
            let mut at = Place {
                origin,
                practice: PracticeRef::Index(i),
            };
            let id = string(t, "id")
                .and_then(|s| PracticeId::parse(s).map_err(|_| Problem::BadId))
                .map_err(|p| at.error("id", p))?;
            if let Some(&first) = first_index.get(id.as_str()) {
                return Err(at.error("id", Problem::DuplicatePractice(first)));
            }
            first_index.insert(id.as_str().to_string(), i);
            at.practice = PracticeRef::Id(id.clone());
            practices.insert(id.as_str().to_string(), practice(t, &at)?);
        }
        Ok(Roster { practices })
    }

    /// Who `practice`'s escalation pages at `at`; `None` if the roster does
    /// not know the practice.
    pub fn on_call(&self, practice: &str, at: Timestamp) -> Option<OnCall<'_>> {
        let p = self.practices.get(practice)?;
        // The practice's wall clock, so that DST moves the shifts with it.
        let local = at.to_zoned_datetime(p.time_zone.clone());
        let (day, time) = (local.weekday(), local.time());
        Some(OnCall {
            primary: p
                .shifts
                .iter()
                .find(|s| s.covers(day, time))
                .map(|s| &s.clinician),
            backup: &p.backup,
        })
    }

    /// The practices' ids, in order.
    pub fn practice_ids(&self) -> impl Iterator<Item = &str> {
        self.practices.keys().map(String::as_str)
    }
}

/// Where in the file the walk is, for errors.
struct Place<'a> {
    origin: &'a str,
    practice: PracticeRef,
}

impl Place<'_> {
    fn error(&self, field: impl Into<String>, problem: Problem) -> RosterError {
        RosterError::Practice {
            origin: self.origin.to_string(),
            practice: self.practice.clone(),
            field: field.into(),
            problem,
        }
    }
}

const PRACTICE_KEYS: &[&str] = &["id", "time_zone", "backup", "clinician", "shift"];
const CLINICIAN_KEYS: &[&str] = &["id", "name", "phone"];
const SHIFT_KEYS: &[&str] = &["clinician", "days", "start", "end"];

fn practice(t: &toml::Table, at: &Place) -> Result<Practice, RosterError> {
    unknown_key(t, PRACTICE_KEYS, "", at)?;
    let time_zone = string(t, "time_zone")
        .and_then(|s| TimeZone::get(s).map_err(|_| Problem::UnknownTimeZone))
        .map_err(|p| at.error("time_zone", p))?;

    let mut clinicians: Vec<Clinician> = Vec::new();
    let rows = tables(t, "clinician").map_err(|p| at.error("clinician", p))?;
    if rows.is_empty() {
        return Err(at.error("clinician", Problem::NoClinicians));
    }
    for (i, c) in rows.into_iter().enumerate() {
        let field = |key: &str| format!("clinician[{i}].{key}");
        unknown_key(c, CLINICIAN_KEYS, &format!("clinician[{i}]."), at)?;
        let id = string(c, "id")
            .and_then(|s| ClinicianId::parse(s).map_err(|_| Problem::BadId))
            .map_err(|p| at.error(field("id"), p))?;
        if let Some(first) = clinicians.iter().position(|c| c.id == id) {
            return Err(at.error(field("id"), Problem::DuplicateClinician(first)));
        }
        let name = string(c, "name")
            .and_then(|s| {
                let n = s.chars().count();
                if s.trim().is_empty() || n > NAME_MAX || s.chars().any(char::is_control) {
                    Err(Problem::BadName)
                } else {
                    Ok(s.to_string())
                }
            })
            .map_err(|p| at.error(field("name"), p))?;
        let phone = string(c, "phone")
            .and_then(|s| PhoneNumber::parse(s).map_err(Problem::Phone))
            .map_err(|p| at.error(field("phone"), p))?;
        clinicians.push(Clinician { id, name, phone });
    }
    let find = |s: &str| {
        clinicians
            .iter()
            .find(|c| c.id.as_str() == s)
            .cloned()
            .ok_or(Problem::UnknownClinician)
    };

    let backup = string(t, "backup")
        .and_then(find)
        .map_err(|p| at.error("backup", p))?;

    let mut shifts = Vec::new();
    let rows = tables(t, "shift").map_err(|p| at.error("shift", p))?;
    for (i, s) in rows.into_iter().enumerate() {
        let field = |key: &str| format!("shift[{i}].{key}");
        unknown_key(s, SHIFT_KEYS, &format!("shift[{i}]."), at)?;
        let clinician = string(s, "clinician")
            .and_then(find)
            .map_err(|p| at.error(field("clinician"), p))?;
        let days = days(s).map_err(|(f, p)| at.error(field(&f), p))?;
        let start = string(s, "start")
            .and_then(hh_mm)
            .map_err(|p| at.error(field("start"), p))?;
        let end = string(s, "end")
            .and_then(hh_mm)
            .map_err(|p| at.error(field("end"), p))?;
        if start == end {
            return Err(at.error(field("end"), Problem::EndIsStart));
        }
        shifts.push(Shift {
            clinician,
            days,
            start,
            end,
        });
    }
    Ok(Practice {
        time_zone,
        shifts,
        backup,
    })
}

fn unknown_key(
    t: &toml::Table,
    allowed: &[&str],
    prefix: &str,
    at: &Place,
) -> Result<(), RosterError> {
    match t.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(at.error(format!("{prefix}{k}"), Problem::UnknownKey)),
        None => Ok(()),
    }
}

fn string<'t>(t: &'t toml::Table, key: &str) -> Result<&'t str, Problem> {
    match t.get(key) {
        None => Err(Problem::Missing),
        Some(v) => v.as_str().ok_or(Problem::NotString),
    }
}

/// The tables of an array of tables; none if the key is absent.
fn tables<'t>(t: &'t toml::Table, key: &str) -> Result<Vec<&'t toml::Table>, Problem> {
    match t.get(key) {
        None => Ok(Vec::new()),
        Some(toml::Value::Array(rows)) => rows
            .iter()
            .map(|r| r.as_table().ok_or(Problem::NotTables))
            .collect(),
        Some(_) => Err(Problem::NotTables),
    }
}

/// A shift's `days`; the error's field is `days` or `days[i]`.
fn days(t: &toml::Table) -> Result<Days, (String, Problem)> {
    let field = "days".to_string();
    let list = match t.get("days") {
        None => return Err((field, Problem::Missing)),
        Some(toml::Value::Array(list)) => list,
        Some(_) => return Err((field, Problem::NotStrings)),
    };
    if list.is_empty() {
        return Err((field, Problem::NoDays));
    }
    let mut days = Days(0);
    for (i, v) in list.iter().enumerate() {
        let at = || format!("days[{i}]");
        let day = match v.as_str() {
            Some("mon") => Weekday::Monday,
            Some("tue") => Weekday::Tuesday,
            Some("wed") => Weekday::Wednesday,
            Some("thu") => Weekday::Thursday,
            Some("fri") => Weekday::Friday,
            Some("sat") => Weekday::Saturday,
            Some("sun") => Weekday::Sunday,
            Some(_) => return Err((at(), Problem::BadDay)),
            None => return Err((at(), Problem::NotString)),
        };
        if days.contains(day) {
            return Err((at(), Problem::RepeatedDay));
        }
        days.0 |= Days::bit(day);
    }
    Ok(days)
}

/// `HH:MM`, exactly: two digits each, 00:00 to 23:59.
fn hh_mm(s: &str) -> Result<Time, Problem> {
    let (h, m) = s.split_once(':').ok_or(Problem::BadTime)?;
    let two_digits = |p: &str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit());
    if !two_digits(h) || !two_digits(m) {
        return Err(Problem::BadTime);
    }
    let (h, m) = (
        h.parse().map_err(|_| Problem::BadTime)?,
        m.parse().map_err(|_| Problem::BadTime)?,
    );
    Time::new(h, m, 0, 0).map_err(|_| Problem::BadTime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORTIZ_PHONE: &str = "+15555550101";
    const LEE_PHONE: &str = "+15555550102";

    /// Ortiz works weekdays, Kim Friday and Saturday nights; on Sundays Lee
    /// and then Ortiz hold a clinic, overlapping from 12:00 to 14:00.
    const ROSTER: &str = r#"
[[practice]]
id = "practice-1"
time_zone = "America/New_York"
backup = "dr-lee"

[[practice.clinician]]
id = "dr-ortiz"
name = "Dr. Ana Ortiz"
phone = "+15555550101"

[[practice.clinician]]
id = "dr-lee"
name = "Dr. Sam Lee"
phone = "+15555550102"

[[practice.clinician]]
id = "dr-kim"
name = "Dr. Jo Kim"
phone = "+15555550103"

[[practice.shift]]
clinician = "dr-ortiz"
days = ["mon", "tue", "wed", "thu", "fri"]
start = "08:00"
end = "18:00"

[[practice.shift]]
clinician = "dr-kim"
days = ["fri", "sat"]
start = "22:00"
end = "06:00"

[[practice.shift]]
clinician = "dr-lee"
days = ["sun"]
start = "10:00"
end = "14:00"

[[practice.shift]]
clinician = "dr-ortiz"
days = ["sun"]
start = "12:00"
end = "16:00"

[[practice]]
id = "practice-2"
time_zone = "Europe/London"
backup = "gp-one"

[[practice.clinician]]
id = "gp-one"
name = "Dr. One"
phone = "+447700900001"
"#;

    fn roster() -> Roster {
        Roster::parse(ROSTER, "test.toml").expect("the test roster is valid")
    }

    fn at(s: &str) -> Timestamp {
        s.parse().expect("test timestamp")
    }

    #[test]
    fn who_is_on_call() {
        let roster = roster();
        // (practice, instant, primary's id or None when the backup is paged)
        let cases: &[(&str, &str, Option<&str>)] = &[
            // Weekday shift, Monday 2026-11-23 (EST, UTC-5).
            ("practice-1", "2026-11-23T13:00:00Z", Some("dr-ortiz")), // 08:00, first minute
            ("practice-1", "2026-11-23T12:59:59Z", None),             // 07:59:59
            ("practice-1", "2026-11-23T22:59:59Z", Some("dr-ortiz")), // 17:59:59
            ("practice-1", "2026-11-23T23:00:00Z", None),             // 18:00: end is exclusive
            ("practice-1", "2026-11-23T15:00:00-05:00", Some("dr-ortiz")),
            // Saturday: no day shift.
            ("practice-1", "2026-11-28T15:00:00Z", None),
            // Friday 22:00-06:00 covers Friday late and Saturday early.
            ("practice-1", "2026-11-28T02:59:59Z", None), // Fri 21:59:59
            ("practice-1", "2026-11-28T03:00:00Z", Some("dr-kim")), // Fri 22:00
            ("practice-1", "2026-11-28T08:00:00Z", Some("dr-kim")), // Sat 03:00
            ("practice-1", "2026-11-28T11:00:00Z", None), // Sat 06:00
            // Saturday's runs into Sunday; nothing runs into Monday.
            ("practice-1", "2026-11-29T10:59:00Z", Some("dr-kim")), // Sun 05:59
            ("practice-1", "2026-11-24T08:00:00Z", None),           // Tue 03:00
            ("practice-1", "2026-11-23T08:00:00Z", None),           // Mon 03:00
            // The same Monday 08:30 in summer (EDT, UTC-4) and winter.
            ("practice-1", "2026-07-06T12:30:00Z", Some("dr-ortiz")),
            ("practice-1", "2026-01-05T12:30:00Z", None), // 07:30 EST
            // Sunday 2026-11-29: Lee 10:00-14:00 is listed before Ortiz
            // 12:00-16:00, so Lee wins where both cover.
            ("practice-1", "2026-11-29T14:59:00Z", None), // 09:59
            ("practice-1", "2026-11-29T17:00:00Z", Some("dr-lee")), // 12:00
            ("practice-1", "2026-11-29T18:59:00Z", Some("dr-lee")), // 13:59
            ("practice-1", "2026-11-29T19:00:00Z", Some("dr-ortiz")), // 14:00
            ("practice-1", "2026-11-29T21:00:00Z", None), // 16:00
            // Spring forward, Sunday 2026-03-08: 02:00 EST becomes 03:00 EDT.
            // The Saturday night shift still ends at 06:00 on the wall
            // clock, which is 10:00Z now, not 11:00Z.
            ("practice-1", "2026-03-08T06:59:59Z", Some("dr-kim")), // 01:59:59 EST
            ("practice-1", "2026-03-08T07:00:00Z", Some("dr-kim")), // 03:00 EDT
            ("practice-1", "2026-03-08T09:59:59Z", Some("dr-kim")), // 05:59:59 EDT
            ("practice-1", "2026-03-08T10:00:00Z", None),           // 06:00 EDT
            ("practice-1", "2026-03-08T10:30:00Z", None),           // 06:30 EDT
            // Fall back, Sunday 2026-11-01: 02:00 EDT becomes 01:00 EST, so
            // 01:00-02:00 happens twice and the night shift is 9 hours.
            ("practice-1", "2026-11-01T10:30:00Z", Some("dr-kim")), // 05:30 EST
            ("practice-1", "2026-11-01T11:00:00Z", None),           // 06:00 EST
            ("practice-1", "2026-11-01T05:15:00Z", Some("dr-kim")), // 01:15 EDT
            ("practice-1", "2026-11-01T06:15:00Z", Some("dr-kim")), // 01:15 EST
            // Another zone: London's 08:00 Monday is 08:00Z in winter, and
            // it has no shifts at all, so always the backup.
            ("practice-2", "2026-11-23T08:00:00Z", None),
        ];
        for (practice, instant, primary) in cases {
            let on_call = roster
                .on_call(practice, at(instant))
                .expect("known practice");
            assert_eq!(
                on_call.primary.map(|c| c.id.as_str()),
                *primary,
                "{practice} at {instant}"
            );
            let backup = if *practice == "practice-1" {
                "dr-lee"
            } else {
                "gp-one"
            };
            assert_eq!(on_call.backup.id.as_str(), backup);
            assert_eq!(
                on_call.paged().id.as_str(),
                primary.unwrap_or(backup),
                "{practice} at {instant}: nobody on call pages the backup"
            );
        }
    }

    #[test]
    fn an_unknown_practice_has_no_answer() {
        let roster = roster();
        for practice in ["practice-3", "", "PRACTICE-1"] {
            assert!(
                roster
                    .on_call(practice, at("2026-11-23T15:00:00Z"))
                    .is_none()
            );
        }
        assert_eq!(
            roster.practice_ids().collect::<Vec<_>>(),
            ["practice-1", "practice-2"]
        );
    }

    #[test]
    fn clinicians_print_without_name_or_number() {
        let roster = roster();
        let on_call = roster
            .on_call("practice-1", at("2026-11-23T15:00:00Z"))
            .expect("known");
        let debug = format!("{on_call:?} {roster:?}");
        for secret in ["Ortiz", "Lee", ORTIZ_PHONE, LEE_PHONE] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(debug.contains("dr-ortiz") && debug.contains("+*********01"));
        let ortiz = on_call.paged();
        assert_eq!(
            (ortiz.name.as_str(), ortiz.phone.expose()),
            ("Dr. Ana Ortiz", ORTIZ_PHONE)
        );
    }

    #[test]
    fn the_example_file_is_valid_and_does_what_its_comments_say() {
        let roster = Roster::parse(
            include_str!("../roster.example.toml"),
            "roster.example.toml",
        )
        .expect("the example is valid");
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("practice-1", "2026-11-23T15:00:00-05:00", Some("dr-ortiz")),
            ("practice-1", "2026-11-28T03:00:00-05:00", Some("dr-patel")), // Sat 03:00
            ("practice-1", "2026-11-29T12:00:00-05:00", None),             // Sunday
        ];
        for (practice, instant, primary) in cases {
            let on_call = roster.on_call(practice, at(instant)).expect("known");
            assert_eq!(
                on_call.primary.map(|c| c.id.as_str()),
                *primary,
                "{instant}"
            );
            assert_eq!(on_call.backup.id.as_str(), "dr-lee");
        }
    }

    /// One practice, one clinician, one shift, valid; each case edits it.
    const BASE: &str = r#"[[practice]]
id = "p1"
time_zone = "America/New_York"
backup = "dr-ortiz"
[[practice.clinician]]
id = "dr-ortiz"
name = "Dr. Ana Ortiz"
phone = "+15555550101"
[[practice.shift]]
clinician = "dr-ortiz"
days = ["mon"]
start = "08:00"
end = "18:00"
"#;

    const SECOND_CLINICIAN: &str = r#"[[practice.clinician]]
id = "dr-lee"
name = "Dr. Sam Lee"
phone = "+15555550102"
"#;

    #[test]
    fn base_roster_is_valid() {
        Roster::parse(BASE, "r.toml").expect("valid");
        Roster::parse(&format!("{BASE}{SECOND_CLINICIAN}"), "r.toml").expect("valid");
    }

    #[test]
    fn validation_errors_name_file_practice_and_field_and_never_a_value() {
        // (what to replace in BASE, with what, the whole message)
        let cases: &[(&str, &str, &str)] = &[
            // The file.
            (BASE, "", "r.toml: practice: the roster has no [[practice]]"),
            (
                "[[practice]]",
                "[[practices]]\n[[practice]]",
                "r.toml: practices: is not a roster key",
            ),
            (
                BASE,
                "practice = \"p1\"\n",
                "r.toml: practice: must be an array of tables ([[...]])",
            ),
            // The practice.
            ("id = \"p1\"\n", "", "r.toml: practice[0]: id: is missing"),
            (
                "id = \"p1\"",
                "id = \"p 1\"",
                "r.toml: practice[0]: id: must be 1-128 characters of A-Z a-z 0-9 . _ : -",
            ),
            (
                "id = \"p1\"",
                "id = 1",
                "r.toml: practice[0]: id: must be a string",
            ),
            (
                "time_zone = \"America/New_York\"",
                "time_zone = \"America/Springfield\"",
                "r.toml: practice \"p1\": time_zone: is not a time zone of the IANA database (such as America/New_York)",
            ),
            (
                "time_zone = \"America/New_York\"",
                "time_zone = \"-05:00\"",
                "r.toml: practice \"p1\": time_zone: is not a time zone of the IANA database (such as America/New_York)",
            ),
            (
                "time_zone = \"America/New_York\"\n",
                "",
                "r.toml: practice \"p1\": time_zone: is missing",
            ),
            (
                "backup = \"dr-ortiz\"\n",
                "",
                "r.toml: practice \"p1\": backup: is missing",
            ),
            (
                "backup = \"dr-ortiz\"",
                "backup = \"dr-who\"",
                "r.toml: practice \"p1\": backup: names no clinician of this practice",
            ),
            (
                "backup = \"dr-ortiz\"",
                "backup = \"Dr. Ana Ortiz\"",
                "r.toml: practice \"p1\": backup: names no clinician of this practice",
            ),
            (
                "backup = \"dr-ortiz\"",
                "backup = \"+15555550101\"",
                "r.toml: practice \"p1\": backup: names no clinician of this practice",
            ),
            (
                "backup = \"dr-ortiz\"",
                "backup = 15555550101",
                "r.toml: practice \"p1\": backup: must be a string",
            ),
            (
                "backup = \"dr-ortiz\"",
                "backup = \"dr-ortiz\"\npager = \"sms\"",
                "r.toml: practice \"p1\": pager: is not a roster key",
            ),
            // Clinicians.
            (
                "[[practice.clinician]]\nid = \"dr-ortiz\"\nname = \"Dr. Ana Ortiz\"\nphone = \"+15555550101\"\n",
                "",
                "r.toml: practice \"p1\": clinician: a practice needs at least one [[practice.clinician]]",
            ),
            (
                "id = \"dr-ortiz\"\nname",
                "id = \"dr ortiz\"\nname",
                "r.toml: practice \"p1\": clinician[0].id: must be 1-128 characters of A-Z a-z 0-9 . _ : -",
            ),
            (
                "id = \"dr-ortiz\"\nname",
                "name",
                "r.toml: practice \"p1\": clinician[0].id: is missing",
            ),
            (
                "name = \"Dr. Ana Ortiz\"\n",
                "",
                "r.toml: practice \"p1\": clinician[0].name: is missing",
            ),
            (
                "name = \"Dr. Ana Ortiz\"",
                "name = \"  \"",
                "r.toml: practice \"p1\": clinician[0].name: must be 1-200 characters, none of them control characters",
            ),
            (
                "name = \"Dr. Ana Ortiz\"",
                "name = \"Dr. Ana\\nOrtiz\"",
                "r.toml: practice \"p1\": clinician[0].name: must be 1-200 characters, none of them control characters",
            ),
            (
                "name = \"Dr. Ana Ortiz\"",
                "name = [\"Dr. Ana Ortiz\"]",
                "r.toml: practice \"p1\": clinician[0].name: must be a string",
            ),
            (
                "phone = \"+15555550101\"",
                "phone = \"15555550101\"",
                "r.toml: practice \"p1\": clinician[0].phone: must start with + and the country code (E.164)",
            ),
            (
                "phone = \"+15555550101\"",
                "phone = \"+1 555 555 0101\"",
                "r.toml: practice \"p1\": clinician[0].phone: must be digits only after the + (no spaces or punctuation)",
            ),
            (
                "phone = \"+15555550101\"",
                "phone = \"+1555\"",
                "r.toml: practice \"p1\": clinician[0].phone: must have 8-15 digits after the +",
            ),
            (
                "phone = \"+15555550101\"",
                "phone = 15555550101",
                "r.toml: practice \"p1\": clinician[0].phone: must be a string",
            ),
            (
                "phone = \"+15555550101\"\n",
                "",
                "r.toml: practice \"p1\": clinician[0].phone: is missing",
            ),
            (
                "phone = \"+15555550101\"",
                "phone = \"+15555550101\"\nemail = \"ana@example.com\"",
                "r.toml: practice \"p1\": clinician[0].email: is not a roster key",
            ),
            // Shifts.
            (
                "clinician = \"dr-ortiz\"\ndays",
                "clinician = \"dr-who\"\ndays",
                "r.toml: practice \"p1\": shift[0].clinician: names no clinician of this practice",
            ),
            (
                "clinician = \"dr-ortiz\"\ndays",
                "clinician = \"Dr. Ana Ortiz\"\ndays",
                "r.toml: practice \"p1\": shift[0].clinician: names no clinician of this practice",
            ),
            (
                "clinician = \"dr-ortiz\"\ndays",
                "days",
                "r.toml: practice \"p1\": shift[0].clinician: is missing",
            ),
            (
                "days = [\"mon\"]",
                "days = [\"mon\", \"funday\"]",
                "r.toml: practice \"p1\": shift[0].days[1]: must be one of mon, tue, wed, thu, fri, sat, sun",
            ),
            (
                "days = [\"mon\"]",
                "days = [\"Mon\"]",
                "r.toml: practice \"p1\": shift[0].days[0]: must be one of mon, tue, wed, thu, fri, sat, sun",
            ),
            (
                "days = [\"mon\"]",
                "days = [\"mon\", \"tue\", \"mon\"]",
                "r.toml: practice \"p1\": shift[0].days[2]: lists a day twice",
            ),
            (
                "days = [\"mon\"]",
                "days = [\"mon\", 2]",
                "r.toml: practice \"p1\": shift[0].days[1]: must be a string",
            ),
            (
                "days = [\"mon\"]",
                "days = []",
                "r.toml: practice \"p1\": shift[0].days: must list at least one day",
            ),
            (
                "days = [\"mon\"]",
                "days = \"mon\"",
                "r.toml: practice \"p1\": shift[0].days: must be an array of strings",
            ),
            (
                "days = [\"mon\"]\n",
                "",
                "r.toml: practice \"p1\": shift[0].days: is missing",
            ),
            (
                "start = \"08:00\"",
                "start = \"8:00\"",
                "r.toml: practice \"p1\": shift[0].start: must be HH:MM, from 00:00 to 23:59",
            ),
            (
                "start = \"08:00\"",
                "start = \"24:00\"",
                "r.toml: practice \"p1\": shift[0].start: must be HH:MM, from 00:00 to 23:59",
            ),
            (
                "start = \"08:00\"",
                "start = \"08:60\"",
                "r.toml: practice \"p1\": shift[0].start: must be HH:MM, from 00:00 to 23:59",
            ),
            (
                "start = \"08:00\"",
                "start = \"08:00:00\"",
                "r.toml: practice \"p1\": shift[0].start: must be HH:MM, from 00:00 to 23:59",
            ),
            (
                "start = \"08:00\"",
                "start = \"+8:00\"",
                "r.toml: practice \"p1\": shift[0].start: must be HH:MM, from 00:00 to 23:59",
            ),
            (
                "start = \"08:00\"",
                "start = 08:00:00",
                "r.toml: practice \"p1\": shift[0].start: must be a string",
            ),
            (
                "end = \"18:00\"",
                "end = \"6pm\"",
                "r.toml: practice \"p1\": shift[0].end: must be HH:MM, from 00:00 to 23:59",
            ),
            (
                "end = \"18:00\"\n",
                "",
                "r.toml: practice \"p1\": shift[0].end: is missing",
            ),
            (
                "end = \"18:00\"",
                "end = \"08:00\"",
                "r.toml: practice \"p1\": shift[0].end: is the same as start; a shift needs a length (a 24-hour shift is two shifts)",
            ),
            (
                "end = \"18:00\"",
                "end = \"18:00\"\nnote = \"x\"",
                "r.toml: practice \"p1\": shift[0].note: is not a roster key",
            ),
            (
                "[[practice.shift]]",
                "[practice.shift]",
                "r.toml: practice \"p1\": shift: must be an array of tables ([[...]])",
            ),
        ];
        for (from, to, want) in cases {
            assert!(BASE.contains(from), "{from:?} is not in BASE");
            let text = BASE.replacen(from, to, 1);
            let e = Roster::parse(&text, "r.toml")
                .expect_err(&format!("{from:?} -> {to:?}"))
                .to_string();
            assert_eq!(e, format!("roster file {want}"), "{from:?} -> {to:?}");
            for secret in ["Ortiz", "5555", "0101"] {
                assert!(!e.contains(secret), "{e:?} echoes a value");
            }
        }
    }

    #[test]
    fn duplicate_ids_name_both_places() {
        let second_practice = BASE.replace("id = \"p1\"", "id = \"p2\"");
        // (roster, the whole message)
        let cases: &[(String, &str)] = &[
            (
                format!("{BASE}{BASE}"),
                "roster file r.toml: practice[1]: id: is also the id of practice[0]",
            ),
            (
                format!("{BASE}{second_practice}{BASE}"),
                "roster file r.toml: practice[2]: id: is also the id of practice[0]",
            ),
            (
                format!(
                    "{BASE}{SECOND_CLINICIAN}{}",
                    SECOND_CLINICIAN.replace("dr-lee", "dr-ortiz")
                ),
                "roster file r.toml: practice \"p1\": clinician[2].id: is also the id of clinician[0]",
            ),
        ];
        for (text, want) in cases {
            let e = Roster::parse(text, "r.toml")
                .expect_err("duplicate")
                .to_string();
            assert_eq!(e, *want);
        }
        // The same clinician id in two practices is two people, or one
        // person working for both: either way not a clash.
        Roster::parse(&format!("{BASE}{second_practice}"), "r.toml").expect("valid");
    }

    #[test]
    fn syntax_errors_give_the_line_and_no_text() {
        let cases: &[(&str, &str, usize)] = &[
            ("phone = \"+15555550101\"", "phone = +1-555-555-0101", 8),
            ("phone = \"+15555550101\"", "phone = '+15555550101", 8),
            ("name = \"Dr. Ana Ortiz\"", "name = \"Dr. Ana Ortiz", 7),
            ("name = \"Dr. Ana Ortiz\"", "name = Dr. Ana Ortiz", 7),
            (
                "name = \"Dr. Ana Ortiz\"",
                "name = \"Dr. Ana Ortiz\"\nname = \"Dr. Ana Ortiz\"",
                8,
            ),
        ];
        for (from, to, line) in cases {
            let text = BASE.replacen(from, to, 1);
            let e = Roster::parse(&text, "r.toml").expect_err("not TOML");
            assert!(
                matches!(&e, RosterError::Syntax { line: l, .. } if l == line),
                "{to:?}: {e:?}"
            );
            let e = e.to_string();
            assert!(
                e.starts_with(&format!("roster file r.toml, line {line}: ")),
                "{e}"
            );
            for secret in ["Ortiz", "5555", "0101"] {
                assert!(!e.contains(secret), "{e:?} echoes a value");
            }
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = Roster::load(Path::new("/nonexistent/roster.toml")).expect_err("no file");
        assert_eq!(
            e.to_string(),
            "reading roster file /nonexistent/roster.toml"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
