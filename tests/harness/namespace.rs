//! Private network namespaces: each test's servers bind loopback where nobody else can reach.

use super::*;

pub(super) static NAMESPACE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace with loopback up, deleted on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    pub(super) fn create() -> Namespace {
        remove_stale_namespaces();
        let name = format!(
            "icr-test-{}-{}",
            std::process::id(),
            NAMESPACE_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let namespace = Namespace { name };
        run_ok(Command::new("ip").args(["-n", &namespace.name, "link", "set", "lo", "up"]));
        namespace
    }

    /// Moves the calling thread into the namespace; threads it starts afterwards are in it too
    /// (benchmarks measure from inside, next to the broker).
    pub fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let entered =
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(
            entered,
            0,
            "setns {path}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

/// Deletes namespaces left by test processes that were killed before they could clean up.
pub(super) fn remove_stale_namespaces() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("icr-test-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}
