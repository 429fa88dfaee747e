//! Rule files: what Tier 1 looks for, as data.
//!
//! One TOML file per language (`en.toml`, `es.toml`), named by its language
//! code. A file holds `[[rule]]`s (an id, a category, an action and phrases),
//! `[[exclude]]`s (benign idioms that suppress any rule match they contain),
//! the `[context]` cues that lower an `escalate` to `review`, and the
//! `[vocabulary]` that typos are repaired to. The shipped files are compiled
//! into the binary ([`RuleSet::builtin`]); [`RuleSet::load_dir`] loads others.
//!
//! Loading validates everything and reports every problem at once, each
//! naming the file, the rule and the phrase, so that `crisisd check-rules`
//! can be run like a compiler over a rule change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use super::context::{ContextKind, ContextRule};
use super::normalize::{Normalizer, RISK_EMOJI};
use super::phrase::{self, PhraseError};

/// What a match asks for. Ordered: `Review < Escalate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Ambiguous: send the conversation to the contextual classifier (Tier 2).
    Review,
    /// Unambiguous: escalate at once, no model in the path.
    Escalate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Review => "review",
            Action::Escalate => "escalate",
        }
    }
}

/// Rule categories, after the Columbia Suicide Severity Rating Scale for the
/// self-directed ones, plus the review-only signals around them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    PassiveWish,
    ActiveIdeation,
    Intent,
    PlanOrMethod,
    PreparatoryAct,
    RecentAttempt,
    SelfHarm,
    Hopelessness,
    Burden,
    Farewell,
    AccessToMeans,
    HarmToOthers,
    DangerAtHome,
    ThirdParty,
    RiskEmoji,
    Distress,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::PassiveWish => "passive_wish",
            Category::ActiveIdeation => "active_ideation",
            Category::Intent => "intent",
            Category::PlanOrMethod => "plan_or_method",
            Category::PreparatoryAct => "preparatory_act",
            Category::RecentAttempt => "recent_attempt",
            Category::SelfHarm => "self_harm",
            Category::Hopelessness => "hopelessness",
            Category::Burden => "burden",
            Category::Farewell => "farewell",
            Category::AccessToMeans => "access_to_means",
            Category::HarmToOthers => "harm_to_others",
            Category::DangerAtHome => "danger_at_home",
            Category::ThirdParty => "third_party",
            Category::RiskEmoji => "risk_emoji",
            Category::Distress => "distress",
        }
    }
}

/// A rule as loaded: its literal patterns already normalized.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub language: String,
    pub category: Category,
    pub action: Action,
    /// Expanded, normalized patterns, words separated by single spaces.
    pub patterns: Vec<String>,
    /// When not empty, a match counts only if one of these ends right
    /// before it ("want to" before "die"). Prefixes are checked on a match,
    /// not compiled into the automaton, which keeps the automaton small
    /// however many ways there are to say "I intend to".
    pub prefixes: Vec<String>,
}

/// A screening question from the agent ("have you had thoughts of killing
/// yourself?") and the patient answers that disclose risk ("yes", "every
/// day"). The answer is what the patient says, so it is the patient's
/// detection, under `rule`.
#[derive(Debug, Clone)]
pub struct Screening {
    pub language: String,
    /// Index of the synthetic rule an affirmation is reported under.
    pub rule: usize,
    pub questions: Vec<String>,
    pub answers: Vec<String>,
}

/// Benign idioms: a rule match lying wholly inside one is dropped.
#[derive(Debug, Clone)]
pub struct Exclusion {
    pub id: String,
    pub language: String,
    pub patterns: Vec<String>,
}

/// Every rule of every language, ready to compile into one automaton.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub exclusions: Vec<Exclusion>,
    /// Context rules by language.
    pub context: BTreeMap<String, Vec<ContextRule>>,
    /// Typo-repair targets.
    pub repair: Vec<String>,
    /// Words never rewritten by repair, besides every word a pattern uses.
    pub keep: Vec<String>,
    /// Filler words that may stand between a rule's prefix and its phrase.
    pub prefix_skip: Vec<String>,
    /// Screening questions the agent asks, and the answers that affirm them.
    pub screening: Vec<Screening>,
    /// Files loaded, for reports.
    pub files: Vec<String>,
}

/// A problem in a rule file. Messages name the file, rule and phrase: rule
/// text is ours, never a patient's, so it is safe to print.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RuleError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: cannot read: {message}")]
    Io { file: String, message: String },
    #[error("{dir}: no rule files (en.toml, es.toml, …) found")]
    NoFiles { dir: String },
    #[error("{file}: `language = \"{language}\"` does not match the file name")]
    LanguageMismatch { file: String, language: String },
    #[error("{file}: rule `{rule}`: id already used in {other}")]
    DuplicateId {
        file: String,
        rule: String,
        other: String,
    },
    #[error("{file}: rule `{rule}`: no phrases")]
    NoPhrases { file: String, rule: String },
    #[error("{file}: rule `{rule}`: phrase {phrase:?}: {error}")]
    Phrase {
        file: String,
        rule: String,
        phrase: String,
        error: PhraseError,
    },
    #[error(
        "{file}: rule `{rule}`: phrase {phrase:?}: pattern {pattern:?} normalizes to {normalized:?}; write it as normalized text"
    )]
    NotNormal {
        file: String,
        rule: String,
        phrase: String,
        pattern: String,
        normalized: String,
    },
    #[error("{file}: rule `{rule}`: phrase {phrase:?}: pattern {pattern:?} can never match")]
    Unmatchable {
        file: String,
        rule: String,
        phrase: String,
        pattern: String,
    },
    #[error(
        "{file}: rule `{rule}`: pattern {pattern:?} is identical to exclusion `{exclusion}`, so it can never fire"
    )]
    Shadowed {
        file: String,
        rule: String,
        pattern: String,
        exclusion: String,
    },
    #[error("{file}: rule `{rule}`: phrase {phrase:?}: unknown definition `{{{name}}}`")]
    UnknownDefine {
        file: String,
        rule: String,
        phrase: String,
        name: String,
    },
    #[error(
        "{file}: vocabulary word {word:?} must be lowercase ASCII letters (four or more to repair to, three or more to keep)"
    )]
    BadVocabulary { file: String, word: String },
    #[error("{file}: context `{kind}`: {message}")]
    Context {
        file: String,
        kind: String,
        message: String,
    },
}

/// A finding that does not stop loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleWarning(pub String);

impl fmt::Display for RuleWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDef {
    language: String,
    /// Named phrase fragments, used in phrases as `{name}`.
    #[serde(default)]
    define: BTreeMap<String, String>,
    /// Filler words that may stand between a prefix and its phrase.
    #[serde(default)]
    prefix_skip: Vec<String>,
    #[serde(default)]
    vocabulary: VocabularyDef,
    #[serde(default)]
    context: BTreeMap<ContextKind, ContextDef>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleDef>,
    #[serde(default, rename = "exclude")]
    exclusions: Vec<ExcludeDef>,
    #[serde(default)]
    screening: Vec<ScreeningDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScreeningDef {
    id: String,
    category: Category,
    action: Action,
    questions: Vec<String>,
    /// Answers that disclose risk: "yes" to "have you thought of killing
    /// yourself?", "I don't know" to "are you safe right now?".
    answers: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    note: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VocabularyDef {
    #[serde(default)]
    repair: Vec<String>,
    #[serde(default)]
    keep: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContextDef {
    #[serde(default)]
    before: Vec<String>,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    adjacent: bool,
    #[serde(default = "default_reach")]
    reach: usize,
    #[serde(default)]
    skip: Vec<String>,
    #[serde(default)]
    barriers: Vec<String>,
    /// Phrases after which a cue is none ("dont know" before "if").
    #[serde(default)]
    not_after: Vec<String>,
}

fn default_reach() -> usize {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDef {
    id: String,
    category: Category,
    action: Action,
    phrases: Vec<String>,
    #[serde(default)]
    prefix: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)] // for the reader of the file
    note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExcludeDef {
    id: String,
    phrases: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    note: Option<String>,
}

/// The shipped rule files, compiled in so `crisisd` runs from any folder.
pub const BUILTIN: &[(&str, &str)] = &[
    ("rules/en.toml", include_str!("../../rules/en.toml")),
    ("rules/es.toml", include_str!("../../rules/es.toml")),
];

/// The result of loading: the rule set if nothing was wrong, every error
/// otherwise, and the warnings either way.
pub struct Loaded {
    pub rules: Result<RuleSet, Vec<RuleError>>,
    pub warnings: Vec<RuleWarning>,
}

impl RuleSet {
    /// The shipped rules. They are checked by the test suite, so a failure
    /// here is a build defect, reported rather than panicking.
    pub fn builtin() -> Result<RuleSet, Vec<RuleError>> {
        Self::load_builtin().rules
    }

    /// The shipped rules with their warnings, for `check-rules`.
    pub fn load_builtin() -> Loaded {
        Self::from_sources(BUILTIN.iter().map(|(f, t)| (f.to_string(), t.to_string())))
    }

    /// Loads every `<language>.toml` in `dir` (a two- or three-letter
    /// lowercase stem). Other files (say `behavior.toml`) are not phrase
    /// rules and are left alone.
    pub fn load_dir(dir: &Path) -> Loaded {
        let fail = |e: RuleError| Loaded {
            rules: Err(vec![e]),
            warnings: Vec::new(),
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                return fail(RuleError::Io {
                    file: dir.display().to_string(),
                    message: e.to_string(),
                });
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_language_file(p))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return fail(RuleError::NoFiles {
                dir: dir.display().to_string(),
            });
        }
        let mut sources = Vec::new();
        for p in paths {
            match std::fs::read_to_string(&p) {
                Ok(t) => sources.push((p.display().to_string(), t)),
                Err(e) => {
                    return fail(RuleError::Io {
                        file: p.display().to_string(),
                        message: e.to_string(),
                    });
                }
            }
        }
        Self::from_sources(sources)
    }

    /// Parses and validates rule files given as (file name, text).
    pub fn from_sources(sources: impl IntoIterator<Item = (String, String)>) -> Loaded {
        let mut b = Builder::default();
        for (file, text) in sources {
            b.file(&file, &text);
        }
        b.finish()
    }

    /// Rule counts by (language, category, action), for reports.
    pub fn counts(&self) -> BTreeMap<(String, Category, Action), (usize, usize)> {
        let mut m: BTreeMap<(String, Category, Action), (usize, usize)> = BTreeMap::new();
        for r in &self.rules {
            let e = m
                .entry((r.language.clone(), r.category, r.action))
                .or_default();
            e.0 += 1;
            e.1 += r.patterns.len();
        }
        m
    }
}

fn is_language_file(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "toml")
        && p.file_stem().and_then(|s| s.to_str()).is_some_and(|s| {
            (2..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase())
        })
}

#[derive(Default)]
struct Builder {
    set: RuleSet,
    errors: Vec<RuleError>,
    warnings: Vec<RuleWarning>,
    /// id → file, for duplicate reports.
    ids: HashMap<String, String>,
    /// exclusion pattern → exclusion id, for shadow checks.
    exclusion_patterns: HashMap<String, String>,
    /// (file, rule id) per rule, for reports after the fact.
    rule_files: Vec<String>,
    /// The current file's `[define]` table.
    defines: BTreeMap<String, String>,
    /// Rule text is normalized without typo repair.
    basic: Normalizer,
}

impl Builder {
    fn file(&mut self, file: &str, text: &str) {
        let def: FileDef = match toml::from_str(text) {
            Ok(d) => d,
            Err(e) => {
                self.errors.push(RuleError::Parse {
                    file: file.to_string(),
                    message: e.to_string(),
                });
                return;
            }
        };
        self.set.files.push(file.to_string());
        self.defines = def.define;
        let stem = Path::new(file).file_stem().and_then(|s| s.to_str());
        if stem != Some(def.language.as_str()) {
            self.errors.push(RuleError::LanguageMismatch {
                file: file.to_string(),
                language: def.language.clone(),
            });
        }
        // Repair targets need four letters to be distinctive; kept words
        // need three, the shortest a repair ever touches.
        let words = def.vocabulary.repair.iter().map(|w| (w, 4));
        for (w, min) in words.chain(def.vocabulary.keep.iter().map(|w| (w, 3))) {
            if w.len() < min || !w.bytes().all(|b| b.is_ascii_lowercase()) {
                self.errors.push(RuleError::BadVocabulary {
                    file: file.to_string(),
                    word: w.clone(),
                });
            }
        }
        self.set.repair.extend(def.vocabulary.repair);
        self.set.prefix_skip.extend(def.prefix_skip);
        self.set.keep.extend(def.vocabulary.keep);

        let mut contexts = Vec::new();
        for (kind, c) in def.context {
            if c.reach > super::context::MAX_REACH {
                self.errors.push(RuleError::Context {
                    file: file.to_string(),
                    kind: kind.as_str().to_string(),
                    message: format!(
                        "reach {} is more than {} words",
                        c.reach,
                        super::context::MAX_REACH
                    ),
                });
            }
            let mut cues = |list: &[String]| -> Vec<Vec<String>> {
                let mut out = Vec::new();
                for cue in list {
                    if let Some(ps) =
                        self.patterns(file, &format!("context.{}", kind.as_str()), cue)
                    {
                        out.extend(
                            ps.into_iter()
                                .map(|p| p.split(' ').map(str::to_string).collect()),
                        );
                    }
                }
                out
            };
            let before = cues(&c.before);
            let after = cues(&c.after);
            let not_after = cues(&c.not_after);
            // Skip words and barriers are compared a word at a time with
            // normalized text: a phrase or an unnormalized word there would
            // never match, silently.
            for (field, w) in c
                .skip
                .iter()
                .map(|w| ("skip", w))
                .chain(c.barriers.iter().map(|w| ("barriers", w)))
            {
                let message = if w.is_empty() || w.contains(' ') {
                    Some(format!("{field}: {w:?} is not one word"))
                } else {
                    let normalized = self.basic.normalize(w);
                    (normalized != *w).then(|| {
                        format!("{field}: {w:?} normalizes to {normalized:?}; write it as normalized text")
                    })
                };
                if let Some(message) = message {
                    self.errors.push(RuleError::Context {
                        file: file.to_string(),
                        kind: kind.as_str().to_string(),
                        message,
                    });
                }
            }
            if before.is_empty() && after.is_empty() {
                self.errors.push(RuleError::Context {
                    file: file.to_string(),
                    kind: kind.as_str().to_string(),
                    message: "no cues".to_string(),
                });
            }
            contexts.push(
                ContextRule::new(kind, before, after, c.adjacent, c.reach, c.skip, c.barriers)
                    .with_not_after(not_after),
            );
        }
        self.set
            .context
            .entry(def.language.clone())
            .or_default()
            .extend(contexts);

        // Exclusions first, so rules can be checked against them.
        for x in def.exclusions {
            if !self.claim_id(file, &x.id) {
                continue;
            }
            let mut patterns = Vec::new();
            for ph in &x.phrases {
                if let Some(ps) = self.patterns(file, &x.id, ph) {
                    patterns.extend(ps);
                }
            }
            if x.phrases.is_empty() {
                self.errors.push(RuleError::NoPhrases {
                    file: file.to_string(),
                    rule: x.id.clone(),
                });
            }
            for p in &patterns {
                self.exclusion_patterns
                    .entry(p.clone())
                    .or_insert_with(|| x.id.clone());
            }
            self.set.exclusions.push(Exclusion {
                id: x.id,
                language: def.language.clone(),
                patterns,
            });
        }
        for sc in def.screening {
            let id = sc.id;
            if self.claim_id(file, &id) {
                let mut questions = Vec::new();
                for q in &sc.questions {
                    questions.extend(self.patterns(file, &id, q).unwrap_or_default());
                }
                let mut answers = Vec::new();
                for y in &sc.answers {
                    answers.extend(self.patterns(file, &id, y).unwrap_or_default());
                }
                self.rule_files.push(file.to_string());
                self.set.screening.push(Screening {
                    language: def.language.clone(),
                    rule: self.set.rules.len(),
                    questions,
                    answers,
                });
                self.set.rules.push(Rule {
                    id,
                    language: def.language.clone(),
                    category: sc.category,
                    action: sc.action,
                    patterns: Vec::new(),
                    prefixes: Vec::new(),
                });
            }
        }
        for r in def.rules {
            if !self.claim_id(file, &r.id) {
                continue;
            }
            if r.phrases.is_empty() {
                self.errors.push(RuleError::NoPhrases {
                    file: file.to_string(),
                    rule: r.id.clone(),
                });
            }
            let mut patterns = Vec::new();
            for ph in &r.phrases {
                if let Some(ps) = self.patterns(file, &r.id, ph) {
                    patterns.extend(ps);
                }
            }
            let mut seen = HashSet::new();
            patterns.retain(|p| seen.insert(p.clone()));
            let mut prefixes = Vec::new();
            for ph in &r.prefix {
                if let Some(ps) = self.patterns(file, &r.id, ph) {
                    prefixes.extend(ps);
                }
            }
            let mut seen = HashSet::new();
            prefixes.retain(|p| seen.insert(p.clone()));
            self.rule_files.push(file.to_string());
            self.set.rules.push(Rule {
                id: r.id,
                language: def.language.clone(),
                category: r.category,
                action: r.action,
                patterns,
                prefixes,
            });
        }
    }

    fn claim_id(&mut self, file: &str, id: &str) -> bool {
        if let Some(other) = self.ids.get(id) {
            self.errors.push(RuleError::DuplicateId {
                file: file.to_string(),
                rule: id.to_string(),
                other: other.clone(),
            });
            return false;
        }
        self.ids.insert(id.to_string(), file.to_string());
        true
    }

    /// Expands and checks one phrase; `None` after recording an error.
    fn patterns(&mut self, file: &str, rule: &str, phrase: &str) -> Option<Vec<String>> {
        let substituted = match substitute(phrase, &self.defines) {
            Ok(s) => s,
            Err(name) => {
                self.errors.push(RuleError::UnknownDefine {
                    file: file.to_string(),
                    rule: rule.to_string(),
                    phrase: phrase.to_string(),
                    name,
                });
                return None;
            }
        };
        let expanded = match phrase::expand(&substituted) {
            Ok(e) => e,
            Err(error) => {
                self.errors.push(RuleError::Phrase {
                    file: file.to_string(),
                    rule: rule.to_string(),
                    phrase: phrase.to_string(),
                    error,
                });
                return None;
            }
        };
        let mut out = Vec::with_capacity(expanded.len());
        let mut ok = true;
        for words in expanded {
            let written: Vec<&str> = words
                .iter()
                .map(|w| emoji_token(w).unwrap_or(w.as_str()))
                .collect();
            let written = written.join(" ");
            let normalized = self.basic.normalize(&words.join(" "));
            if normalized.is_empty() {
                self.errors.push(RuleError::Unmatchable {
                    file: file.to_string(),
                    rule: rule.to_string(),
                    phrase: phrase.to_string(),
                    pattern: words.join(" "),
                });
                ok = false;
                continue;
            }
            // Expansion can put a word next to itself ("my my insurance"); the
            // input side collapses such repeats, so the pattern does too.
            if normalized != written && normalized != collapse_repeats(&written) {
                self.errors.push(RuleError::NotNormal {
                    file: file.to_string(),
                    rule: rule.to_string(),
                    phrase: phrase.to_string(),
                    pattern: words.join(" "),
                    normalized,
                });
                ok = false;
                continue;
            }
            out.push(normalized);
        }
        ok.then_some(out)
    }

    fn finish(mut self) -> Loaded {
        // Shadowing: a rule pattern identical to an exclusion pattern.
        for (r, file) in self.set.rules.iter().zip(&self.rule_files) {
            for p in &r.patterns {
                if let Some(x) = self.exclusion_patterns.get(p) {
                    self.errors.push(RuleError::Shadowed {
                        file: file.clone(),
                        rule: r.id.clone(),
                        pattern: p.clone(),
                        exclusion: x.clone(),
                    });
                }
            }
        }
        // Vocabulary words nobody uses, and exclusions that contain no rule
        // pattern, are harmless but probably mistakes.
        let words: HashSet<&str> = self
            .set
            .rules
            .iter()
            .flat_map(|r| {
                r.patterns
                    .iter()
                    .chain(&r.prefixes)
                    .flat_map(|p| p.split(' '))
            })
            .collect();
        for w in &self.set.repair {
            if !words.contains(w.as_str()) {
                self.warnings.push(RuleWarning(format!(
                    "vocabulary word {w:?} appears in no rule pattern"
                )));
            }
        }
        let rule_patterns: HashSet<&str> = self
            .set
            .rules
            .iter()
            .flat_map(|r| r.patterns.iter().map(String::as_str))
            .collect();
        for x in &self.set.exclusions {
            let useful = x.patterns.iter().any(|xp| {
                let words: Vec<&str> = xp.split(' ').collect();
                (0..words.len()).any(|i| {
                    (i + 1..=words.len())
                        .any(|j| rule_patterns.contains(words[i..j].join(" ").as_str()))
                })
            });
            if !useful {
                self.warnings.push(RuleWarning(format!(
                    "exclusion `{}` contains no rule pattern, so it suppresses nothing",
                    x.id
                )));
            }
        }
        let Builder {
            set,
            errors,
            warnings,
            ..
        } = self;
        Loaded {
            rules: if errors.is_empty() {
                Ok(set)
            } else {
                Err(errors)
            },
            warnings,
        }
    }
}

/// Replaces each `{name}` in `phrase` with `(definition)`. Definitions may
/// use earlier ones, to a small depth. Returns the unknown name on failure.
fn substitute(phrase: &str, defines: &BTreeMap<String, String>) -> Result<String, String> {
    let mut s = phrase.to_string();
    for _ in 0..4 {
        let Some(open) = s.find('{') else {
            return Ok(s);
        };
        let mut out = String::with_capacity(s.len() * 2);
        let mut rest = &s[..];
        let mut at = open;
        loop {
            out.push_str(&rest[..at]);
            rest = &rest[at + 1..];
            let close = rest.find('}').ok_or_else(|| rest.to_string())?;
            let name = &rest[..close];
            let body = defines.get(name).ok_or_else(|| name.to_string())?;
            out.push('(');
            out.push_str(body);
            out.push(')');
            rest = &rest[close + 1..];
            match rest.find('{') {
                Some(i) => at = i,
                None => {
                    out.push_str(rest);
                    break;
                }
            }
        }
        s = out;
    }
    if s.contains('{') {
        return Err("(definitions nested too deeply)".to_string());
    }
    Ok(s)
}

/// The token an emoji stands for in normalized text.
fn emoji_token(w: &str) -> Option<&'static str> {
    let mut chars = w.chars().filter(|c| !matches!(c, '\u{FE0E}' | '\u{FE0F}'));
    let c = chars.next()?;
    if chars.next().is_some() {
        return None;
    }
    RISK_EMOJI.iter().find(|(e, _)| *e == c).map(|(_, t)| *t)
}

/// Collapses immediate repeats of one or two words, as the normalizer does.
fn collapse_repeats(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for w in p.split(' ') {
        out.push(w);
        loop {
            let n = out.len();
            if n >= 2 && out[n - 1] == out[n - 2] {
                out.pop();
            } else if n >= 4 && out[n - 1] == out[n - 3] && out[n - 2] == out[n - 4] {
                out.truncate(n - 2);
            } else {
                break;
            }
        }
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Loaded {
        RuleSet::from_sources([("xx/en.toml".to_string(), text.to_string())])
    }

    fn errors(text: &str) -> Vec<String> {
        match load(text).rules {
            Ok(_) => Vec::new(),
            Err(es) => es.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn builtin_rules_load_cleanly() {
        let loaded = RuleSet::load_builtin();
        if let Err(es) = &loaded.rules {
            panic!(
                "{}",
                es.iter().map(|e| format!("{e}\n")).collect::<String>()
            );
        }
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn error_table() {
        let cases: &[(&str, &str)] = &[
            (
                "language = \"en\"\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"cut myself\"]\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"burn myself\"]",
                "xx/en.toml: rule `a`: id already used in xx/en.toml",
            ),
            (
                "language = \"en\"\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"(cut myself\"]",
                "xx/en.toml: rule `a`: phrase \"(cut myself\": unbalanced `(`",
            ),
            (
                "language = \"en\"\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"Cut Myself\"]",
                "xx/en.toml: rule `a`: phrase \"Cut Myself\": pattern \"Cut Myself\" normalizes to \"cut myself\"; write it as normalized text",
            ),
            (
                "language = \"en\"\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"i'm cutting\"]",
                "xx/en.toml: rule `a`: phrase \"i'm cutting\": pattern \"i'm cutting\" normalizes to \"im cutting\"; write it as normalized text",
            ),
            (
                "language = \"en\"\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"...\"]",
                "xx/en.toml: rule `a`: phrase \"...\": pattern \"...\" can never match",
            ),
            (
                "language = \"en\"\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = []",
                "xx/en.toml: rule `a`: no phrases",
            ),
            (
                "language = \"en\"\n[[exclude]]\nid = \"x\"\nphrases = [\"cut myself\"]\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"cut myself\"]",
                "xx/en.toml: rule `a`: pattern \"cut myself\" is identical to exclusion `x`, so it can never fire",
            ),
            (
                "language = \"en\"\n[context.past]\nbefore = [\"years ago\"]\nbarriers = [\"last night\"]\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"cut myself\"]",
                "xx/en.toml: context `past`: barriers: \"last night\" is not one word",
            ),
            (
                "language = \"en\"\n[context.negation]\nbefore = [\"not\"]\nskip = [\"for real\"]\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"cut myself\"]",
                "xx/en.toml: context `negation`: skip: \"for real\" is not one word",
            ),
            (
                "language = \"en\"\n[context.negation]\nbefore = [\"not\"]\nskip = [\"Really\"]\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"cut myself\"]",
                "xx/en.toml: context `negation`: skip: \"Really\" normalizes to \"really\"; write it as normalized text",
            ),
            (
                "language = \"es\"\n",
                "xx/en.toml: `language = \"es\"` does not match the file name",
            ),
            (
                "language = \"en\"\n[[rule]]\nid = \"a\"\ncategory = \"sadness\"\naction = \"escalate\"\nphrases = [\"x\"]",
                "xx/en.toml: unknown variant `sadness`",
            ),
        ];
        for (text, want) in cases {
            let got = errors(text);
            assert!(
                got.iter()
                    .any(|g| g.starts_with(want)
                        || g.contains(want.trim_start_matches("xx/en.toml: "))),
                "want {want:?}\n got {got:?}"
            );
        }
    }

    #[test]
    fn definitions_expand() {
        let l = load(
            "language = \"en\"\n[define]\nwill = \"going to|gonna\"\nact = \"{will} (kill|hurt)\"\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"{act} myself\"]",
        );
        let set = l.rules.unwrap();
        assert_eq!(
            set.rules[0].patterns,
            vec![
                "going to kill myself",
                "going to hurt myself",
                "gonna kill myself",
                "gonna hurt myself"
            ]
        );
        let errs = errors(
            "language = \"en\"\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"{nope} myself\"]",
        );
        assert_eq!(
            errs,
            vec!["xx/en.toml: rule `a`: phrase \"{nope} myself\": unknown definition `{nope}`"]
        );
    }

    #[test]
    fn emoji_phrases_are_their_tokens() {
        let l = load(
            "language = \"en\"\n[[rule]]\nid = \"e\"\ncategory = \"risk_emoji\"\naction = \"review\"\nphrases = [\"\u{1F48A}\", \"\u{26B0}\u{FE0F}\"]",
        );
        let set = l.rules.unwrap();
        assert_eq!(set.rules[0].patterns, vec![":pill:", ":coffin:"]);
    }

    #[test]
    fn useless_exclusion_is_a_warning() {
        let l = load(
            "language = \"en\"\n[[exclude]]\nid = \"x\"\nphrases = [\"killing time\"]\n[[rule]]\nid = \"a\"\ncategory = \"self_harm\"\naction = \"escalate\"\nphrases = [\"cut myself\"]",
        );
        assert!(l.rules.is_ok());
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    }
}
