use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use std::time::Instant;
fn main() {
    let rules = crisisd::tier1::RuleSet::builtin().unwrap();
    let mut pats: Vec<String> = rules.rules.iter().flat_map(|r| r.patterns.clone()).collect();
    pats.extend(rules.exclusions.iter().flat_map(|x| x.patterns.clone()));
    let bytes: usize = pats.iter().map(|p| p.len()).sum();
    println!("{} patterns {} bytes", pats.len(), bytes);
    let text = "i have been so tired lately and honestly i dont know what to do about my appointment next week can we move it ".repeat(20000);
    for dd in [0usize, 1, 2, 3] { for bc in [true, false] {
        let t = Instant::now();
        let ac = AhoCorasick::builder().match_kind(MatchKind::Standard).kind(Some(AhoCorasickKind::ContiguousNFA)).dense_depth(dd).byte_classes(bc).build(&pats).unwrap();
        let bt = t.elapsed();
        let t = Instant::now();
        let n = ac.find_overlapping_iter(&text).count();
        let st = t.elapsed();
        println!("dense_depth={dd} byte_classes={bc} build {bt:?} scan {:.0} MB/s matches {n} mem {}", text.len() as f64 / st.as_secs_f64() / 1e6, ac.memory_usage());
    }}
}
