fn main() {
    let l = crisisd::tier1::RuleSet::load_dir(std::path::Path::new("rules"));
    let r = match l.rules { Ok(r) => r, Err(e) => { for x in e.iter().take(10) { eprintln!("{x}"); } return; } };
    let mut v: Vec<(usize, String)> = r.rules.iter().map(|x| (x.patterns.len(), format!("{} (+{} prefixes)", x.id, x.prefixes.len()))).collect();
    v.extend(r.exclusions.iter().map(|x| (x.patterns.len(), x.id.clone())));
    v.sort(); for (n, id) in v.iter().rev() { println!("{n:>7} {id}"); }
}
