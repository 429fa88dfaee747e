//! The `crisisd` command line, run as a user runs it: replay, eval and
//! check-rules over the corpora and over broken input, and oncall over the
//! example roster and broken ones.

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
        "holdout4.jsonl",
        "holdout5.jsonl",
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
    assert!(
        stdout.contains("behavior.cancellation_streak             moderate  cooldown 30days"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("ok"));
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let out = crisisd(&["check-rules", &shipped.display().to_string()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("rules/behavior.toml"));
}

#[test]
fn check_rules_names_a_behavior_rule_it_cannot_evaluate() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let read = |f: &str| std::fs::read_to_string(shipped.join(f)).expect("shipped rules");
    let (en, es) = (read("en.toml"), read("es.toml"));
    let dir = temp_rules(&[
        ("en.toml", &en),
        ("es.toml", &es),
        (
            "behavior.toml",
            "[[rule]]\nid = \"b.never\"\nseverity = \"low\"\ncooldown = \"1d\"\non = { kinds = [] }\nafter_review = {}\n",
        ),
    ]);
    let out = crisisd(&["check-rules", &dir.display().to_string()], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "behavior.toml: rule `b.never`: `on.kinds` is empty: the rule could never fire"
        ),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
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

fn example_roster() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("roster.example.toml")
        .display()
        .to_string()
}

#[test]
fn oncall_prints_the_primary_and_the_backup() {
    let roster = example_roster();
    const LEE: &str = "backup: dr-lee Dr. Sam Lee +15555550102\n";
    // (practice, --at, exit code, stdout, stderr that says why)
    let cases: &[(&str, &str, i32, &str, &str)] = &[
        // Monday 15:00 in New York: the weekday shift.
        (
            "practice-1",
            "2026-11-23T15:00:00-05:00",
            0,
            "primary: dr-ortiz Dr. Ana Ortiz +15555550101\n",
            "",
        ),
        // The same moment in UTC.
        (
            "practice-1",
            "2026-11-23T20:00:00Z",
            0,
            "primary: dr-ortiz Dr. Ana Ortiz +15555550101\n",
            "",
        ),
        // Saturday 03:00 in New York: Friday's overnight shift.
        (
            "practice-1",
            "2026-11-28T08:00:00Z",
            0,
            "primary: dr-patel Dr. Ravi Patel +15555550103\n",
            "",
        ),
        // Sunday noon: no shift, the backup is paged.
        (
            "practice-1",
            "2026-11-29T12:00:00-05:00",
            0,
            "primary: nobody on call (the backup is paged)\n",
            "",
        ),
        (
            "practice-9",
            "2026-11-23T20:00:00Z",
            1,
            "",
            "crisisd: practice \"practice-9\" is not in the roster",
        ),
        // A time with no offset is no instant.
        (
            "practice-1",
            "2026-11-23T15:00:00",
            1,
            "",
            "crisisd: --at must be RFC 3339 with an offset",
        ),
    ];
    for (practice, at, code, primary, why) in cases {
        let out = crisisd(
            &[
                "oncall",
                "--roster",
                &roster,
                "--practice",
                practice,
                "--at",
                at,
            ],
            None,
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(*code), "{practice} {at}: {stderr}");
        if *code == 0 {
            assert_eq!(stdout, format!("{primary}{LEE}"), "{practice} {at}");
        } else {
            assert_eq!(stdout, "", "{practice} {at}");
        }
        assert!(stderr.starts_with(why), "{practice} {at}: {stderr}");
    }
}

#[test]
fn oncall_without_at_answers_for_now() {
    let roster = example_roster();
    let out = crisisd(
        &["oncall", "--roster", &roster, "--practice", "practice-2"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // practice-2 has no shifts: its backup, whatever the time.
    assert_eq!(
        text(&out.stdout),
        "primary: nobody on call (the backup is paged)\nbackup: dr-nguyen Dr. Linh Nguyen +15555550201\n"
    );
}

#[test]
fn oncall_refuses_an_invalid_roster_naming_the_field_but_no_value() {
    let example = std::fs::read_to_string(example_roster()).expect("example roster");
    let dir = std::env::temp_dir().join(format!("crisisd-roster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let lee_name_line = 1 + example
        .lines()
        .position(|l| l == "name = \"Dr. Sam Lee\"")
        .expect("the example names Dr. Lee");
    let syntax = format!(", line {lee_name_line}: ");
    // (file name, text, what the error must say)
    let cases: &[(&str, String, &str)] = &[
        (
            "bad-phone.toml",
            example.replacen("+15555550102", "+1 555 555 0102", 1),
            "practice \"practice-1\": clinician[1].phone: must be digits only after the +",
        ),
        (
            "bad-backup.toml",
            example.replacen("backup = \"dr-lee\"", "backup = \"Dr. Sam Lee\"", 1),
            "practice \"practice-1\": backup: names no clinician of this practice",
        ),
        (
            "not-toml.toml",
            example.replacen("name = \"Dr. Sam Lee\"", "name = Dr. Sam Lee", 1),
            &syntax,
        ),
    ];
    for (name, body, want) in cases {
        let path = dir.join(name);
        std::fs::write(&path, body).expect("write roster");
        let path = path.display().to_string();
        let out = crisisd(
            &["oncall", "--roster", &path, "--practice", "practice-1"],
            None,
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert_eq!(text(&out.stdout), "", "{name}");
        assert!(
            stderr.starts_with(&format!("crisisd: roster file {path}")),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(want), "{name}: want {want:?} in {stderr}");
        for secret in ["Sam Lee", "555 0102", "5550102"] {
            assert!(!stderr.contains(secret), "{name}: {stderr} echoes a value");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
