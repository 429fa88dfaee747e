//! Tier 1 passes over the bench's texts, one at a time, for what criterion
//! does not show: exact instruction counts under callgrind, the spread of
//! single passes on a shared host, and a listing of every detection to
//! compare two builds by.
//!
//! ```text
//! cargo build --release --example tier1_passes
//! B=target/release/examples/tier1_passes
//! valgrind --tool=callgrind --toggle-collect='*Matcher*detect*' $B detect 1
//! valgrind --tool=callgrind --toggle-collect='*Matcher*feed*' $B typical 1
//! $B passes 300           # fastest, p10, p50, p90 of 300 timed passes
//! diff <($OLD dump) <($B dump)
//! ```

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use crisisd::tier1::Matcher;

#[path = "../benches/common/tier1_texts.rs"]
mod tier1_texts;
use tier1_texts::{feed_as_finals, long_text, utterances};

const USAGE: &str = "usage: tier1_passes detect|passes|typical [N] | dump";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let n = match args.get(2).map(|s| s.parse::<usize>()) {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let matcher = match Matcher::builtin() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("rules: {e}");
            return ExitCode::FAILURE;
        }
    };
    let long = long_text();
    let mib = long.len() as f64 / 1048576.0;
    match mode {
        // `n` passes of `detect` over the long text.
        "detect" => {
            let t = Instant::now();
            let mut found = 0;
            for _ in 0..n {
                found += matcher.detect(black_box(&long)).len();
            }
            let s = t.elapsed().as_secs_f64();
            println!("{found} detections, {:.1} MiB/s", n as f64 * mib / s);
        }
        // `n` passes timed one by one: a shared host shows as two modes.
        "passes" => {
            let mut secs: Vec<f64> = (0..n)
                .map(|_| {
                    let t = Instant::now();
                    black_box(matcher.detect(black_box(&long)).len());
                    t.elapsed().as_secs_f64()
                })
                .collect();
            secs.sort_by(f64::total_cmp);
            let rate = |q: usize| mib / secs[q.min(n - 1)];
            println!(
                "MiB/s over {n} passes: fastest {:.1} p10 {:.1} p50 {:.1} p90 {:.1}",
                rate(0),
                rate(n / 10),
                rate(n / 2),
                rate(n * 9 / 10)
            );
        }
        // The bench's typical loop, `n` times.
        "typical" => {
            let utts = utterances(10);
            let t = Instant::now();
            let mut found = 0;
            for _ in 0..n {
                found += feed_as_finals(&matcher, &utts);
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "{found} detections, {:.0} utterances/s",
                (n * utts.len()) as f64 / s
            );
        }
        // Every detection of the long text and of each utterance.
        "dump" => {
            for d in matcher.detect(&long) {
                println!("{d:?}");
            }
            for u in utterances(10).iter().chain(&utterances(1)) {
                println!("{:?}", matcher.detect(u));
            }
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
