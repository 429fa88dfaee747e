//! The phrase syntax of rule files, and its expansion into literal patterns.
//!
//! A phrase is words separated by spaces, with two constructs:
//!
//! * `(a|b c|d)`: exactly one of the alternatives, each a sequence of words;
//! * `[a|b]`: optionally one of the alternatives.
//!
//! Both nest. `(kill|hurt) (myself|my self)` expands to four patterns and
//! `going to [go] end it` to two. Expansion is eager: the automaton then only
//! ever sees literals, which keeps matching a single pass. The cost is bounded
//! by [`MAX_EXPANSIONS`] per phrase, so a careless rule fails at load instead
//! of silently blowing up the automaton.

use thiserror::Error;

/// Most patterns one phrase may expand to.
pub const MAX_EXPANSIONS: usize = 20_000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PhraseError {
    #[error("the phrase is empty")]
    Empty,
    #[error("unbalanced `{0}`")]
    Unbalanced(char),
    #[error("an empty alternative (use [...] for optional words)")]
    EmptyAlternative,
    #[error("every word is optional, so the phrase can match nothing")]
    AllOptional,
    #[error("the phrase expands to more than {MAX_EXPANSIONS} patterns")]
    TooMany,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Word(&'a str),
    Open(char),
    Close(char),
    Bar,
}

fn lex(phrase: &str) -> Vec<Tok<'_>> {
    let mut toks = Vec::new();
    let mut start: Option<usize> = None;
    for (i, c) in phrase.char_indices() {
        let special = matches!(c, '(' | ')' | '[' | ']' | '|');
        if c.is_whitespace() || special {
            if let Some(s) = start.take() {
                toks.push(Tok::Word(&phrase[s..i]));
            }
            match c {
                '(' | '[' => toks.push(Tok::Open(c)),
                ')' | ']' => toks.push(Tok::Close(c)),
                '|' => toks.push(Tok::Bar),
                _ => {}
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        toks.push(Tok::Word(&phrase[s..]));
    }
    toks
}

/// Expands `phrase` into its literal patterns, each a list of words, in the
/// order written. Duplicates are removed.
pub fn expand(phrase: &str) -> Result<Vec<Vec<String>>, PhraseError> {
    let toks = lex(phrase);
    if toks.is_empty() {
        return Err(PhraseError::Empty);
    }
    let mut pos = 0;
    let out = parse_alts(&toks, &mut pos, None)?;
    if pos != toks.len() {
        // A stray closer at top level.
        if let Tok::Close(c) = toks[pos] {
            return Err(PhraseError::Unbalanced(c));
        }
    }
    let mut out: Vec<Vec<String>> = out
        .into_iter()
        .map(|p| p.into_iter().map(str::to_string).collect())
        .collect();
    if out.iter().any(Vec::is_empty) {
        return Err(PhraseError::AllOptional);
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Ok(out)
}

type Expansion<'a> = Vec<Vec<&'a str>>;

/// alts := seq ('|' seq)*, up to the closer `until`.
fn parse_alts<'a>(
    toks: &[Tok<'a>],
    pos: &mut usize,
    until: Option<char>,
) -> Result<Expansion<'a>, PhraseError> {
    let mut all: Expansion<'a> = Vec::new();
    loop {
        let seq = parse_seq(toks, pos)?;
        if seq.iter().all(Vec::is_empty) && until.is_some() {
            return Err(PhraseError::EmptyAlternative);
        }
        all.extend(seq);
        if all.len() > MAX_EXPANSIONS {
            return Err(PhraseError::TooMany);
        }
        match toks.get(*pos) {
            // Top-level alternatives are allowed too: `a b|c d`.
            Some(Tok::Bar) => *pos += 1,
            Some(Tok::Close(c)) => {
                let want = match until {
                    Some('(') => ')',
                    Some('[') => ']',
                    _ => return Err(PhraseError::Unbalanced(*c)),
                };
                if *c != want {
                    return Err(PhraseError::Unbalanced(*c));
                }
                *pos += 1;
                return Ok(all);
            }
            None => {
                return match until {
                    Some(open) => Err(PhraseError::Unbalanced(open)),
                    None => Ok(all),
                };
            }
            Some(_) => unreachable!("parse_seq stops only at `|`, a closer or the end"),
        }
    }
}

/// seq := item*, stopping at `|`, a closer, or the end.
fn parse_seq<'a>(toks: &[Tok<'a>], pos: &mut usize) -> Result<Expansion<'a>, PhraseError> {
    let mut acc: Expansion<'a> = vec![Vec::new()];
    while let Some(t) = toks.get(*pos) {
        let item: Expansion<'a> = match *t {
            Tok::Word(w) => {
                *pos += 1;
                vec![vec![w]]
            }
            Tok::Open(c) => {
                *pos += 1;
                let mut alts = parse_alts(toks, pos, Some(c))?;
                if c == '[' {
                    alts.push(Vec::new());
                }
                alts
            }
            Tok::Bar | Tok::Close(_) => break,
        };
        if acc.len().saturating_mul(item.len()) > MAX_EXPANSIONS {
            return Err(PhraseError::TooMany);
        }
        let mut next = Vec::with_capacity(acc.len() * item.len());
        for a in &acc {
            for i in &item {
                let mut p = a.clone();
                p.extend_from_slice(i);
                next.push(p);
            }
        }
        acc = next;
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(phrase: &str) -> Vec<String> {
        expand(phrase)
            .unwrap()
            .into_iter()
            .map(|p| p.join(" "))
            .collect()
    }

    #[test]
    fn expansion_table() {
        let cases: &[(&str, &[&str])] = &[
            ("kill myself", &["kill myself"]),
            (
                "(kill|hurt) (myself|my self)",
                &["kill myself", "kill my self", "hurt myself", "hurt my self"],
            ),
            (
                "going to [go] end it",
                &["going to go end it", "going to end it"],
            ),
            ("[so|very] sad", &["so sad", "very sad", "sad"]),
            (
                "(take (my|all my) pills|overdose)",
                &["take my pills", "take all my pills", "overdose"],
            ),
            ("a b|c", &["a b", "c"]),
            ("want(to)die", &["want to die"]),
        ];
        for (phrase, want) in cases {
            assert_eq!(flat(phrase), *want, "{phrase}");
        }
    }

    #[test]
    fn error_table() {
        let cases: &[(&str, PhraseError)] = &[
            ("", PhraseError::Empty),
            ("   ", PhraseError::Empty),
            ("(kill myself", PhraseError::Unbalanced('(')),
            ("kill myself)", PhraseError::Unbalanced(')')),
            ("[kill myself)", PhraseError::Unbalanced(')')),
            ("(kill||hurt) myself", PhraseError::EmptyAlternative),
            ("() myself", PhraseError::EmptyAlternative),
            ("[really]", PhraseError::AllOptional),
            (
                "(a|b|c|d|e|f|g|h) (a|b|c|d|e|f|g|h) (a|b|c|d|e|f|g|h) (a|b|c|d|e|f|g|h) (a|b|c|d|e|f|g|h)",
                PhraseError::TooMany,
            ),
        ];
        for (phrase, want) in cases {
            assert_eq!(expand(phrase).unwrap_err(), *want, "{phrase:?}");
        }
    }
}
