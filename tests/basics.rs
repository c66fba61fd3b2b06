//! Exit statuses and output (SPEC §2), as a user meets them.

mod common;
use common::{Env, run};

#[test]
fn success_is_silent_and_passes_output_through() {
    let env = Env::new();
    let (code, out, err) = run(env
        .qsem()
        .args(["--id", "demo", "-j2", "--wait", "1s", "--", "echo", "hello"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "hello\n", ""));
}
