//! Shared by the integration tests: finding the CPython 3.11 reference interpreter.

use std::process::Command;

/// Set to `1` to skip (rather than fail) the checks that need CPython 3.11.
pub const SKIP_VAR: &str = "TWIN_SKIP_PYTHON_ORACLE";

/// The interpreter to run (`TWIN_PYTHON`, default `python3`), or `None` when it is missing or not
/// 3.11 and `TWIN_SKIP_PYTHON_ORACLE=1` is set. Without that variable such a machine fails the
/// test: the rules are only proven against 3.11, so a silent pass would prove nothing.
pub fn python311() -> Option<String> {
    let python = std::env::var("TWIN_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let found = Command::new(&python)
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output();
    let problem = match found {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if version == "3.11" {
                return Some(python);
            }
            format!("`{python}` is Python {version}, not 3.11")
        }
        Ok(out) => format!(
            "`{python}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => format!("cannot run `{python}`: {e}"),
    };
    if std::env::var(SKIP_VAR).as_deref() == Ok("1") {
        eprintln!("SKIPPED: {problem} ({SKIP_VAR}=1)");
        return None;
    }
    panic!(
        "{problem}. These tests compare against CPython 3.11 (set TWIN_PYTHON to its path), \
         or set {SKIP_VAR}=1 to skip them."
    );
}

/// `s` with everything but printable ASCII written as `\u{..}`, for mismatch reports.
#[allow(dead_code, reason = "only differential.rs reports strings")]
pub fn escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if (' '..='~').contains(&c) && c != '\\' {
                c.to_string()
            } else {
                format!("\\u{{{:x}}}", c as u32)
            }
        })
        .collect()
}
