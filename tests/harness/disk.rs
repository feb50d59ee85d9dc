//! Small file systems for tests of full disks: mounted for one test, filled, measured.

/// A small file system mounted for one test (state dir), unmounted on drop even when the test
/// fails. Needs root, as every test here.
pub struct TestMount {
    path: std::path::PathBuf,
}

impl TestMount {
    pub fn mount(path: &std::path::Path, args: &[&str]) -> TestMount {
        std::fs::create_dir_all(path).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(args)
            .arg(path)
            .status()
            .expect("mount");
        assert!(status.success(), "mount {args:?} {}", path.display());
        TestMount {
            path: path.to_owned(),
        }
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Fills the file system holding `dir` with one file until the disk says no.
pub fn fill_disk(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
    path
}

/// Bytes free on the file system holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> u64 {
    let output = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .expect("df");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)
        .and_then(|line| line.trim().parse().ok())
        .expect("df output")
}
