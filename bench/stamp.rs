//! The benchmark's job: appends `S <pid> <ns>` (CLOCK_MONOTONIC) to LOG as its
//! very first action, sleeps HOLD milliseconds (`inf`: until killed;
//! `until:PATH`: until PATH exists, looking every millisecond), then
//! appends `E <pid> <ns>` as its very last action and exits. One write(2) per
//! line on an O_APPEND file, so lines from concurrent jobs never interleave.

use std::io::Write;

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

unsafe extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

fn now_ns() -> i64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; 1 is CLOCK_MONOTONIC on Linux.
    unsafe { clock_gettime(1, &mut ts) };
    ts.sec * 1_000_000_000 + ts.nsec
}

fn main() {
    let t = now_ns();
    let mut args = std::env::args().skip(1);
    let log = args.next().expect("usage: stamp LOG [HOLD_MS|inf|until:PATH]");
    let hold = args.next().unwrap_or_else(|| "0".into());
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .expect("open log");
    let pid = std::process::id();
    f.write_all(format!("S {pid} {t}\n").as_bytes()).unwrap();
    if hold == "inf" {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    if let Some(path) = hold.strip_prefix("until:") {
        while !std::path::Path::new(path).exists() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    let ms: u64 = hold.strip_prefix("until:").map_or(hold.as_str(), |_| "0").parse().expect("HOLD_MS");
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let line = format!("E {pid} ");
    let t = now_ns();
    f.write_all(format!("{line}{t}\n").as_bytes()).unwrap();
}
