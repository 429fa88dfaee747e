use std::time::Instant;
fn main() {
    let t = Instant::now();
    let rules = crisisd::tier1::RuleSet::builtin().unwrap();
    let t1 = t.elapsed();
    let n: usize = rules.rules.iter().map(|r| r.patterns.len()).sum();
    let t = Instant::now();
    let m = crisisd::tier1::Matcher::new(rules).unwrap();
    println!("load {:?} build {:?} rule patterns {} literals {}", t1, t.elapsed(), n, m.pattern_count());
}
