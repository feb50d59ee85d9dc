//! What the .deb ships besides the binary: the man pages and shell completions generated from
//! the CLI definition (kept in `packaging/` so `cargo deb` needs no build step; this test fails
//! when they drift, and `UPDATE_PACKAGING=1 cargo test --test packaging` rewrites them), and
//! the unit's static checks (`systemd-analyze verify` silent, security exposure ≤ 1.5).

use std::path::Path;
use std::process::Command;

use clap::CommandFactory;
use clap_complete::Shell;
use iot_cognito_relay::cli::args::Cli;

fn generated() -> Vec<(String, Vec<u8>)> {
    // One page per subcommand, as git does: iot-cognito-relay-run(1) and so on.
    let pages = tempfile::tempdir().expect("tempdir");
    clap_mangen::generate_to(Cli::command(), pages.path()).expect("render man pages");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(pages.path())
        .expect("read pages")
        .map(|entry| {
            let path = entry.expect("entry").path();
            let name = path.file_name().expect("name").to_string_lossy();
            (
                format!("man/{name}"),
                std::fs::read(&path).expect("read page"),
            )
        })
        .collect();
    files.sort();
    for (shell, name) in [
        (Shell::Bash, "completions/iot-cognito-relay.bash"),
        (Shell::Zsh, "completions/_iot-cognito-relay"),
        (Shell::Fish, "completions/iot-cognito-relay.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "iot-cognito-relay", &mut script);
        files.push((name.to_owned(), script));
    }
    files
}

#[test]
fn man_page_and_completions_match_the_cli() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging");
    let update = std::env::var_os("UPDATE_PACKAGING").is_some();
    let files = generated();
    for (name, content) in &files {
        let path = dir.join(name);
        if update {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, content).expect("write");
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            &committed == content,
            "{} is out of date: run UPDATE_PACKAGING=1 cargo test --test packaging",
            path.display()
        );
    }
    for page in [
        "run",
        "send",
        "status",
        "check-config",
        "config-from-stack",
        "subscribe",
    ] {
        let name = format!("man/iot-cognito-relay-{page}.1");
        assert!(files.iter().any(|(file, _)| *file == name), "{name} exists");
    }
}

#[test]
fn unit_verifies_silently_and_scores_at_most_1_5() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/system/verify-unit.sh");
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run verify-unit.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Overall exposure level"), "{stdout}");
}
