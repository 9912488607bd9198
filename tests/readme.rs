//! The README's demo table is the report of the run it names: the figures between its markers
//! must be what `mvlt_cli::demo::report::readme_table` makes of the committed `report.json`.

use std::path::Path;

const START: &str = "<!-- demo table: ";
const END: &str = "<!-- end of demo table -->";

#[test]
fn readme_demo_table_is_the_committed_report() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme.find(START).expect("README.md has no demo table marker");
    let after = &readme[start + START.len()..];
    let (report, rest) = after.split_once(" -->\n").expect("the marker names the report.json it comes from");
    let table = &rest[..rest.find(END).expect("README.md's demo table has no end marker")];
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(report.trim())).unwrap()).unwrap();
    let expected = mvlt_cli::demo::report::readme_table(&json).expect("the report holds every figure of the table");
    assert_eq!(
        table, expected,
        "README.md's demo table differs from {report}; the table of that report is:\n{expected}"
    );
}

#[test]
fn readme_stays_short_and_opens_with_the_two_commands() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines <= 250, "README.md has {lines} lines (at most 250: details go to docs/)");
    let first_block = readme.split("```sh").nth(1).and_then(|b| b.split("```").next()).unwrap();
    assert!(first_block.contains("cargo run --release -- demo"), "{first_block}");
    assert!(first_block.contains("cargo test"), "{first_block}");
}
