//! `forkvm-agent`: the guest agent binary (static, musl). As PID 1 it is the guest's
//! init ([`forkvm_agent::init`]); started by another init it binds vsock port 1024,
//! detaches, and serves, so that init continues only once the agent can be reached.

use forkvm_agent::server::{listen_vsock, Agent, AgentConfig, Mode};
use forkvm_agent::AGENT_PORT;

fn main() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 {
        forkvm_agent::init::run();
    }
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("forkvm-agent {}", forkvm_version::VERSION);
        return;
    }
    let listener = match listen_vsock(AGENT_PORT) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("forkvm-agent: bind vsock port {AGENT_PORT}: {e}");
            std::process::exit(1);
        }
    };
    // Detach once reachable: the parent returns to init, the child serves. No thread
    // exists yet (the reaper starts with the agent, below).
    // SAFETY: single-threaded here; the child only continues this program.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("forkvm-agent: fork: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        0 => {}
        _ => std::process::exit(0),
    }
    let agent = Agent::new(AgentConfig::new("/", Mode::Daemon));
    agent.serve_listener(listener)
}
