//! README's configuration table must list every environment variable the
//! binary reads, and nothing it does not: the table is what operators copy.

use std::collections::BTreeSet;
use std::process::Command;

#[test]
fn readme_env_table_matches_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("env-vars")
        .output()
        .unwrap();
    assert!(out.status.success());
    let from_binary: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Configuration")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let from_readme: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    assert_eq!(
        from_binary, from_readme,
        "README's configuration table and `worker env-vars` disagree"
    );
}
