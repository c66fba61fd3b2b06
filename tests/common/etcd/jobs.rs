//! What the etcd tests run: qsem against a cluster, background holders
//! that a test stops, and jobs that check how many run at once.

use crate::common::{Env, SOON, run, wait_for_file};
use std::process::{Child, Command, Stdio};

pub fn qsem(env: &Env, url: &str) -> Command {
    let mut cmd = env.qsem();
    cmd.args(["--backend", url]);
    cmd
}

/// A background qsem, killed if a test fails before it ends.
pub struct Job(pub Option<Child>);

impl Job {
    pub fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    /// Waits for it: (status, stderr).
    pub fn end(mut self) -> (i32, String) {
        let out = self.0.take().unwrap().wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A job that marks `name.started` (with its slot and fence), then runs
/// until `stop` exists (or the test's directory goes).
pub fn script(env: &Env, name: &str) -> String {
    format!(
        "echo $QSEM_SLOT $QSEM_FENCE > {started}.tmp; mv {started}.tmp {started}; \
         echo {name} >> {order}; \
         while [ -d {root} ] && [ ! -e {stop} ]; do sleep 0.05; done",
        started = env.path(&format!("{name}.started")).display(),
        order = env.path("order").display(),
        root = env.root.display(),
        stop = env.path("stop").display()
    )
}

pub fn spawn(env: &Env, url: &str, args: &[&str], name: &str) -> Job {
    let child = qsem(env, url)
        .args(args)
        .args(["--", "sh", "-c", &script(env, name)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Job(Some(child))
}

/// A holder, once its job has started.
pub fn hold(env: &Env, url: &str, args: &[&str], name: &str) -> Job {
    let job = spawn(env, url, args, name);
    assert!(
        wait_for_file(&env.path(&format!("{name}.started")), SOON),
        "{name} did not start"
    );
    job
}

pub fn started(env: &Env, name: &str) -> bool {
    env.path(&format!("{name}.started")).exists()
}

/// (held, waiting) of an id, from `--status --json`.
pub fn counts(env: &Env, url: &str, id: &str) -> (usize, u32) {
    let (code, out, err) = run(qsem(env, url).args(["--status", "--json", "--id", id]));
    assert_eq!(code, 0, "{err}");
    let held = out.matches("\"slot\":").count();
    let waiting = out.split("\"waiting\":").nth(1).map_or(0, |w| {
        w.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    });
    (held, waiting)
}

/// A job that fails the test's check (a line in `violations`) if, as it
/// starts, `limit` or more jobs that were admitted before it still run:
/// they held their slots when it was admitted. (Jobs admitted after it, by
/// a larger limit, may legally make more.) Each running job has a file in
/// `running/` with its fence, which orders admissions.
pub fn counted(env: &Env, limit: u32, seconds: &str) -> String {
    let dir = env.path("running");
    std::fs::create_dir_all(&dir).unwrap();
    format!(
        "echo $QSEM_FENCE > {d}/$$.tmp; mv {d}/$$.tmp {d}/$$; k=0; \
         for f in {d}/*; do read fe < $f 2>/dev/null && [ \"$fe\" -lt $QSEM_FENCE ] && k=$((k+1)); done; \
         [ $k -lt {limit} ] || echo \"$k admitted before a -j{limit} job (fence $QSEM_FENCE) still ran\" >> {v}; \
         sleep {seconds}; rm {d}/$$",
        d = dir.display(),
        v = env.path("violations").display()
    )
}

pub fn violations(env: &Env) -> String {
    std::fs::read_to_string(env.path("violations")).unwrap_or_default()
}

pub fn stop(env: &Env) {
    std::fs::write(env.path("stop"), "").unwrap();
}
