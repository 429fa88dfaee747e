//! The `crisisd` command line, run as a user runs it: replay, eval and
//! check-rules over the corpora and over broken input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn crisisd(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crisisd"))
        .args(args)
        // From another folder: the shipped rules are compiled in.
        .current_dir(std::env::temp_dir())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("crisisd runs");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("crisisd exits")
}

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
        .display()
        .to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn replay_writes_one_exact_json_object_per_conversation() {
    let out = crisisd(&["replay", &data("sample.jsonl")], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 96);
    assert_eq!(
        lines[0],
        r#"{"id":"s001","outcome":"escalate","tier":1,"rule":"en.active.kill_self","event":0}"#
    );
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 5, "{line}");
        for k in ["id", "outcome", "tier", "rule", "event"] {
            assert!(keys.contains(&k), "{line}");
        }
        let outcome = v["outcome"].as_str().expect("outcome");
        assert!(["escalate", "review", "none"].contains(&outcome));
        assert_eq!(v["tier"].is_null(), outcome == "none", "{line}");
        assert_eq!(v["rule"].is_null(), outcome == "none", "{line}");
    }
    // Field order is part of the format.
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with(r#"{"id":"#) && l.contains(r#","outcome":"#))
    );
    // The deciding event of a split phrase is its second half.
    assert!(
        stdout.contains(
            r#"{"id":"s039","outcome":"escalate","tier":1,"rule":"en.passive_wish.die","event":1}"#
        ),
        "{stdout}"
    );
}

#[test]
fn replay_reads_stdin_and_reports_bad_lines_by_number() {
    let input = concat!(
        r#"{"id":"a","channel":"sms","events":[{"speaker":"patient","text":"see you at 3","final":true}],"label":"escalate"}"#,
        "\n",
        "{not json\n",
        r#"{"id":"b","channel":"sms","events":[{"speaker":"robot","text":"my secret words","final":true}]}"#,
        "\n",
        r#"{"id":"c","channel":"sms","events":[{"speaker":"patient","final":true}]}"#,
        "\n",
        r#"{"id":"d","channel":"voice","events":[{"speaker":"patient","text":"i want to die","final":true}]}"#,
        "\n",
    );
    let out = crisisd(&["replay", "-"], Some(input));
    assert_eq!(out.status.code(), Some(3), "skipped lines give exit code 3");
    let stdout = text(&out.stdout);
    // Labels are ignored; the good lines are still replayed.
    assert_eq!(
        stdout,
        concat!(
            r#"{"id":"a","outcome":"none","tier":null,"rule":null,"event":null}"#,
            "\n",
            r#"{"id":"d","outcome":"escalate","tier":1,"rule":"en.passive_wish.die","event":0}"#,
            "\n"
        )
    );
    let stderr = text(&out.stderr);
    assert!(stderr.contains("line 2: invalid JSON"), "{stderr}");
    assert!(
        stderr.contains("line 3: event 0: unknown speaker"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 4: event 0: missing field `text`"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("secret"),
        "no corpus text in errors: {stderr}"
    );
}

#[test]
fn eval_passes_the_default_thresholds_on_every_corpus() {
    for corpus in [
        "sample.jsonl",
        "dev.jsonl",
        "holdout.jsonl",
        "holdout2.jsonl",
        "holdout3.jsonl",
    ] {
        let out = crisisd(&["eval", &data(corpus)], None);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{corpus}:\n{stdout}");
        let last = stdout.lines().last().unwrap_or_default();
        assert!(last.starts_with("PASS "), "{corpus}: {last}");
        assert!(
            stdout.contains("confusion") && stdout.contains("by tag"),
            "{stdout}"
        );
    }
}

#[test]
fn eval_fails_when_a_threshold_is_missed() {
    // No rule set reaches a false-escalation rate below zero.
    let out = crisisd(
        &["eval", &data("sample.jsonl"), "--min-tier1-recall", "1.01"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("FAIL (tier1-recall"),
        "{stdout}"
    );
}

#[test]
fn check_rules_passes_on_the_shipped_rules_and_counts_them() {
    let out = crisisd(&["check-rules"], None);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{}", stdout, text(&out.stderr));
    assert!(
        stdout.contains("en   passive_wish     escalate"),
        "{stdout}"
    );
    assert!(
        stdout.contains("es   active_ideation  escalate"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("ok"));
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let out = crisisd(&["check-rules", &shipped.display().to_string()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn temp_rules(files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "crisisd-rules-{}-{}",
        std::process::id(),
        files.len() + files.iter().map(|f| f.1.len()).sum::<usize>()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (name, body) in files {
        std::fs::write(dir.join(name), body).expect("write rule file");
    }
    dir
}

#[test]
fn check_rules_names_file_rule_and_phrase() {
    let dir = temp_rules(&[
        (
            "en.toml",
            r#"language = "en"
[[rule]]
id = "a"
category = "self_harm"
action = "escalate"
phrases = ["cut myself", "(burn myself", "I'm Cutting"]
[[exclude]]
id = "x"
phrases = ["cut myself"]
"#,
        ),
        (
            "es.toml",
            r#"language = "es"
[[rule]]
id = "a"
category = "self_harm"
action = "escalate"
phrases = ["me corto"]
"#,
        ),
        ("behavior.toml", "not = \"a phrase file\"\n"),
    ]);
    let out = crisisd(&["check-rules", &dir.display().to_string()], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for want in [
        "en.toml: rule `a`: phrase \"(burn myself\": unbalanced `(`",
        "en.toml: rule `a`: phrase \"I'm Cutting\": pattern \"I'm Cutting\" normalizes to \"im cutting\"",
        "en.toml: rule `a`: pattern \"cut myself\" is identical to exclusion `x`",
        "es.toml: rule `a`: id already used in",
    ] {
        assert!(stderr.contains(want), "want {want:?} in\n{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rules_dir_replaces_the_shipped_rules() {
    let dir = temp_rules(&[(
        "en.toml",
        r#"language = "en"
[[rule]]
id = "test.purple"
category = "distress"
action = "review"
phrases = ["purple (elephant|giraffe)"]
"#,
    )]);
    let input = r#"{"id":"a","channel":"sms","events":[{"speaker":"patient","text":"a Purple Giraffe! and i want to die","final":true}]}"#;
    let out = crisisd(
        &["--rules", &dir.display().to_string(), "replay", "-"],
        Some(input),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        r#"{"id":"a","outcome":"review","tier":1,"rule":"test.purple","event":0}"#
    );
    let _ = std::fs::remove_dir_all(&dir);
}
