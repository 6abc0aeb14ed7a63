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

/// Every `worker <command>` README's command table names is one the binary
/// has (`worker --help` lists it), and README's two commands are the ones
/// the newcomer runs.
#[test]
fn readme_commands_exist_in_the_binary() {
    let help = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    let listed: BTreeSet<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Commands")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let mut checked = 0;
    for row in section.lines().filter(|l| l.starts_with("| `worker")) {
        for cmd in row.split('`').filter(|c| c.starts_with("worker ")) {
            let sub = cmd.split_whitespace().nth(1).unwrap();
            if sub.starts_with('-') || sub == "with" || sub == "without" {
                continue;
            }
            assert!(
                listed.contains(sub),
                "README lists `{cmd}`, but `worker --help` has no `{sub}` (it has {listed:?})"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 8,
        "only {checked} commands found in README's table"
    );
    assert!(
        readme.contains("cargo run --release -- run\n") && readme.contains("cargo test --locked\n"),
        "README's two commands changed; keep them in step with .ci/run and tests/single.rs"
    );
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == "cargo test --locked"),
        ".ci/run must run README's test command"
    );
}
