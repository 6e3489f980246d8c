//! Warm child VMs: VM processes a forking VM starts ahead of time, so that a fork does
//! not wait for them.
//!
//! A fork child's start used to be all on the fork's latency: exec the VM-process
//! executable, create the KVM VM with its irqchip and PIT, create and configure each
//! vCPU (CPUID, MSRs), then map memory and restore state. A [`ChildPool`] does the
//! first part before anyone asks: it keeps `size` VM processes started with a
//! [`Warmup`], each of which has made a [`Prepared`](crate::warm::Prepared) VM (KVM VM, irqchip, PIT, the
//! vCPU fds with CPUID and MSRs set; see [`crate::warm`]), has registered itself in a
//! home staged under the state root's `.staged/` (not listed by `ps`), has mapped the
//! forking VM's memory as of its last fork (or its start) and given it to the VM's
//! memory slots ([`ChildPool::set_memory`]), says so on its socket, and waits for its
//! launch. Only then is it ready: a launch sent to a process still preparing (at the
//! lowest CPU priority) would wait unread. A fork hands a warm process the memory files
//! and the encoded state; it publishes its home (one rename), lays the fork's memory
//! files over what it mapped (mapping only the overlays it lacks: the pages the VM
//! wrote since the fork before, see `GuestRam::relayer`), writes the state into what
//! it prepared and runs. The pool is refilled after each fork, in the background.
//!
//! A warm process lives only as long as its socket to the pool: when the forking VM
//! ends (or is killed), the socket closes and the waiting process exits. One that dies
//! while waiting is dropped when the pool next looks at it, never handed out. A staged
//! home is removed by its process when its socket closes, by the pool when it kills the
//! process or finds it dead, and otherwise (all killed at once) by the next pool that
//! starts under the same root.
//!
//! The warm processes are forked by one zygote per pool ([`crate::zygote`]), so they
//! share the executable's relocated pages with it and each other.
//!
//! Cost: each waiting process is one idle `forkvm-vmm` (measured: 224-360 KiB private
//! forked by the zygote, 1.1-1.3 MiB exec'd, debug build; the rest of its resident
//! memory shared) plus the kernel's memory for one empty KVM VM and its vCPUs, and a
//! staged home (a directory and a state file of a few hundred bytes). Its mapping of
//! the guest memory costs page tables only once the child runs; but it holds the memory
//! files it mapped, so an overlay the forking VM merged away lives on until the warm
//! processes that mapped it are used or end (the pool itself holds the files of the
//! VM's last fork). Per pool, one zygote.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::fs::File;

use crate::launch::ChildHomes;
use crate::launch::VmProcess;
use crate::memory::MemoryLayout;
use crate::warm::{Staging, Warmup};
use crate::zygote::Zygote;

/// Warm processes a VM keeps once it forks, unless configured otherwise.
pub const DEFAULT_FORK_POOL: u32 = 2;
/// Most warm processes one VM may keep (as many as one fork may ask for).
pub const MAX_FORK_POOL: u32 = crate::fork::MAX_CHILDREN;
/// How long the pool waits before trying again after a warm process failed to start.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A warm process and the home it staged, if any (removed by the pool when the
/// process dies or is killed before it was handed out).
struct Warm {
    process: VmProcess,
    staged: Option<PathBuf>,
}

impl Warm {
    /// Whether it still runs; the home of one that ended is removed.
    fn is_alive(&mut self) -> bool {
        let alive = self.process.is_alive();
        if !alive {
            tracing::warn!(
                pid = self.process.pid(),
                "a warm fork process died while waiting"
            );
            self.remove_staged();
        }
        alive
    }

    /// Kills it and removes its home.
    fn kill(mut self) {
        self.process.kill_and_reap();
        self.remove_staged();
    }

    fn remove_staged(&mut self) {
        if let Some(dir) = self.staged.take() {
            // The group it joined while it waited, named by its staged ID.
            if let Some(id) = dir.file_name().and_then(|n| n.to_str()) {
                forkvm_jail::cgroup::remove_when_empty(
                    &forkvm_jail::cgroup::vm_group(id),
                    std::time::Duration::from_secs(1),
                );
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

struct PoolState {
    /// Oldest first.
    ready: VecDeque<Warm>,
    closed: bool,
    /// Not filled until [`ChildPool::refill`] (a pool started for a fork under way, so
    /// that its processes do not compete with the fork's children for the CPU).
    held: bool,
}

/// How a pool starts its warm processes.
#[derive(Clone, Debug)]
pub enum Maker {
    /// Forked by a zygote of this executable ([`crate::zygote`]), which shares the
    /// executable's relocated pages with them; exec'd while no zygote works.
    Zygote(PathBuf),
    /// Exec'd one by one.
    Exec(PathBuf),
}

/// The memory files (base first) warm processes map ahead, and their layout.
type MemoryAhead = (Vec<File>, MemoryLayout);

struct Shared {
    size: usize,
    warmup: Warmup,
    /// The forking VM's memory as warm processes map it ahead: the files (base first)
    /// and their layout, as of the VM's last fork (or its start).
    memory: Mutex<Option<Arc<MemoryAhead>>>,
    maker: Maker,
    state: Mutex<PoolState>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Warm VM processes waiting to become one VM's fork children (see the module
/// documentation).
pub struct ChildPool {
    shared: Arc<Shared>,
    filler: Option<JoinHandle<()>>,
}

impl ChildPool {
    /// A pool that keeps `size` processes made by `maker` warmed up as `warmup` says,
    /// and starts filling it.
    pub fn start(size: u32, warmup: Warmup, maker: Maker) -> std::io::Result<Self> {
        Self::start_filling(size, warmup, maker, true)
    }

    /// [`ChildPool::start`], filling it now or only once [`ChildPool::refill`] (or a
    /// [`Refill`]) says so.
    fn start_filling(size: u32, warmup: Warmup, maker: Maker, now: bool) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            size: size.min(MAX_FORK_POOL) as usize,
            warmup,
            memory: Mutex::new(None),
            maker,
            state: Mutex::new(PoolState {
                ready: VecDeque::new(),
                closed: false,
                held: !now,
            }),
            wake: Condvar::new(),
        });
        let filler = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fork-pool".into())
                .spawn(move || fill(&shared))?
        };
        Ok(Self {
            shared,
            filler: Some(filler),
        })
    }

    /// A pool of `size` warm processes for the fork children of a VM with `vcpus` vCPUs
    /// and `mem_mib` MiB of memory, each staging a home under `homes` when given (under
    /// an ID of its own, renewed per process), forked by a zygote of the installed
    /// VM-process executable; filled now, or once [`ChildPool::refill`]ed when not
    /// `fill_now`. `devices`: the VM's virtio devices by their number of queues (in
    /// MMIO order), whose eventfds each process makes ahead.
    pub fn for_children(
        size: u32,
        vcpus: u8,
        mem_mib: u64,
        devices: Vec<u16>,
        homes: Option<ChildHomes>,
        places: forkvm_jail::Places,
        fill_now: bool,
    ) -> std::io::Result<Self> {
        let exe = crate::launch::vmm_executable()?;
        let warmup = Warmup {
            vcpus,
            stage: homes.map(|homes| Staging {
                homes,
                id: forkvm_registry::new_id(),
                mem_mib,
            }),
            // Jailed as this process jails the VMs it starts, while they wait.
            jail: Some(forkvm_jail::JailSpec::inherited()),
            places,
            memory: None,
            devices: Some(devices),
        };
        Self::start_filling(size, warmup, Maker::Zygote(exe), fill_now)
    }

    /// The oldest warm process that is still alive, if one is ready (prepared); dead
    /// ones are dropped on the way. A pool that was full is not refilled until
    /// [`ChildPool::refill`] (after the fork, so that starting new processes does not
    /// compete with the children's start); one still filling goes on filling.
    pub fn take(&self) -> Option<VmProcess> {
        let mut state = self.shared.lock();
        while let Some(mut w) = state.ready.pop_front() {
            if w.is_alive() {
                // From here the process owns its staged home.
                return Some(w.process);
            }
        }
        None
    }

    /// Waits until `n` warm processes are ready (at most the pool's size), the pool
    /// closes, or `timeout` passes; returns how many are ready.
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> usize {
        let n = n.min(self.shared.size);
        let state = self.shared.lock();
        let (state, _) = self
            .shared
            .wake
            .wait_timeout_while(state, timeout, |s| !s.closed && s.ready.len() < n)
            .unwrap_or_else(|p| p.into_inner());
        state.ready.len()
    }

    /// Has the warm processes started from now on map `files` (base first) as `layout`
    /// says while they wait: the forking VM's memory as of its last fork (or its start).
    /// Those already waiting keep what they mapped (a fork lays its own files over it).
    /// The pool keeps its own descriptors of the files until the next call.
    pub fn set_memory(&self, files: &[&File], layout: MemoryLayout) -> std::io::Result<()> {
        let files = files
            .iter()
            .map(|f| f.try_clone())
            .collect::<std::io::Result<Vec<File>>>()?;
        *self.shared.memory.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new((files, layout)));
        Ok(())
    }

    /// Starts replacing what was taken (and what died), in the background.
    pub fn refill(&self) {
        self.refiller().refill();
    }

    /// What refills this pool from another thread (a fork finishing off the event loop).
    pub fn refiller(&self) -> Refill {
        Refill(self.shared.clone())
    }

    /// The process IDs of the warm processes waiting now.
    pub fn pids(&self) -> Vec<u32> {
        self.shared
            .lock()
            .ready
            .iter()
            .map(|w| w.process.pid())
            .collect()
    }
}

/// Refills a [`ChildPool`] from any thread ([`ChildPool::refiller`]); it does nothing
/// once the pool is gone.
pub struct Refill(Arc<Shared>);

impl Refill {
    /// Starts replacing what was taken (and what died), in the background; a pool that
    /// was held starts filling.
    pub fn refill(&self) {
        self.0.lock().held = false;
        self.0.wake.notify_all();
    }
}

/// The filler thread: keeps `shared.size` live processes ready until the pool closes.
/// It starts as many as are missing, which prepare side by side, and counts each ready
/// once it says it is prepared (a launch sent earlier would wait, unread, behind the
/// preparation, which runs at the lowest CPU priority).
fn fill(shared: &Shared) {
    if let Some(stage) = &shared.warmup.stage {
        forkvm_registry::prune_staged(&stage.homes.root);
    }
    let mut zygote = None;
    // Started and still preparing, each with when it started.
    let mut preparing: Vec<(Warm, Instant)> = Vec::new();
    // After a process failed to start: not before then.
    let mut retry_at: Option<Instant> = None;
    loop {
        let start = {
            let mut state = shared.lock();
            state.ready.retain_mut(Warm::is_alive);
            loop {
                let room = !state.closed
                    && !state.held
                    && state.ready.len() + preparing.len() < shared.size;
                let retry_in = retry_at.and_then(|t| t.checked_duration_since(Instant::now()));
                if state.closed || !preparing.is_empty() || (room && retry_in.is_none()) {
                    break;
                }
                state = match retry_in {
                    Some(d) if room => {
                        shared
                            .wake
                            .wait_timeout(state, d)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    _ => shared.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
                };
                state.ready.retain_mut(Warm::is_alive);
            }
            if state.closed {
                drop(state);
                for (w, _) in preparing {
                    w.kill();
                }
                return;
            }
            !state.held
                && state.ready.len() + preparing.len() < shared.size
                && retry_at.is_none_or(|t| Instant::now() >= t)
        };
        if start {
            match start_warm(shared, &mut zygote) {
                Ok(w) => {
                    preparing.push((w, Instant::now()));
                    retry_at = None;
                }
                Err(e) => {
                    tracing::warn!("cannot start a warm fork process: {e}");
                    retry_at = Some(Instant::now() + RETRY_AFTER);
                }
            }
        }
        // While more are to start, only look; else wait a little for one.
        let wait = if start { Duration::ZERO } else { PREPARED_POLL };
        if collect_prepared(shared, &mut preparing, wait) {
            // One died or hung while preparing: its replacement waits, as after a
            // start that failed (a process that always dies is not restarted in a loop).
            retry_at = Some(Instant::now() + RETRY_AFTER);
        }
    }
}

/// Starts a warm process with the pool's warm-up and its memory as of now.
fn start_warm(shared: &Shared, zygote: &mut Option<Zygote>) -> std::io::Result<Warm> {
    let mut warmup = shared.warmup.renewed();
    let memory = shared
        .memory
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    warmup.memory = memory.as_ref().map(|m| m.1.clone());
    let files = memory.as_ref().map_or(&[][..], |m| &m.0[..]);
    let process = make(&shared.maker, zygote, &warmup, files)?;
    Ok(Warm {
        process,
        staged: warmup.stage.as_ref().map(Staging::dir),
    })
}

/// How long a filler waits at most for a warm process to say it is prepared, when it
/// has nothing else to do (it looks whether its pool closed in between).
const PREPARED_POLL: Duration = Duration::from_millis(100);
/// How long a warm process may take to prepare before it is killed and replaced (it
/// prepares at the lowest CPU priority: on a busy host, slowly).
const PREPARE_DEADLINE: Duration = Duration::from_secs(120);

/// Moves the processes of `preparing` that said they are prepared to the ready list,
/// waiting up to `wait` for one; kills those that failed or ran out of time (and then
/// returns `true`).
fn collect_prepared(shared: &Shared, preparing: &mut Vec<(Warm, Instant)>, wait: Duration) -> bool {
    let mut failed = false;
    if preparing.is_empty() {
        return failed;
    }
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds: Vec<PollFd<'_>> = preparing
        .iter()
        .map(|(w, _)| PollFd::new(w.process.socket(), PollFlags::IN))
        .collect();
    // An interrupted or failed wait only looks again sooner; what each process said is
    // read below.
    let _ = poll(&mut fds, Timespec::try_from(wait).ok().as_ref());
    let said: Vec<bool> = fds.iter().map(|p| !p.revents().is_empty()).collect();
    drop(fds);
    for ((w, started), said) in std::mem::take(preparing).into_iter().zip(said) {
        if !said {
            if started.elapsed() < PREPARE_DEADLINE {
                preparing.push((w, started));
            } else {
                tracing::warn!(
                    pid = w.process.pid(),
                    "a warm fork process did not prepare in {PREPARE_DEADLINE:?}: killed"
                );
                w.kill();
                failed = true;
            }
            continue;
        }
        // Readable: its report is there (8 bytes in one write), or it ended.
        match w.process.wait_prepared(PREPARED_POLL) {
            Ok(true) => {
                let mut state = shared.lock();
                if state.closed {
                    drop(state);
                    w.kill();
                } else {
                    state.ready.push_back(w);
                    shared.wake.notify_all();
                }
            }
            Ok(false) => preparing.push((w, started)),
            Err(e) => {
                tracing::warn!(pid = w.process.pid(), "a warm fork process failed: {e}");
                w.kill();
                failed = true;
            }
        }
    }
    failed
}

/// Starts one warm process as `maker` says: forked by `zygote` (started if there is
/// none; dropped when it fails, so that the next process starts a new one), or exec'd.
fn make(
    maker: &Maker,
    zygote: &mut Option<Zygote>,
    warmup: &Warmup,
    files: &[File],
) -> std::io::Result<VmProcess> {
    let exe = match maker {
        Maker::Exec(exe) => return VmProcess::spawn_warm(exe, warmup, files),
        Maker::Zygote(exe) => exe,
    };
    if zygote.is_none() {
        *zygote = Zygote::start(exe)
            .inspect_err(|e| tracing::warn!("cannot start the fork pool's zygote: {e}"))
            .ok();
    }
    if let Some(z) = zygote {
        match z
            .fork()
            .and_then(|mut p| p.warm_up(warmup, files).map(|()| p))
        {
            Ok(p) => return Ok(p),
            Err(e) => {
                tracing::warn!(pid = z.pid(), "the fork pool's zygote failed: {e}");
                *zygote = None;
            }
        }
    }
    VmProcess::spawn_warm(exe, warmup, files)
}

impl Drop for ChildPool {
    fn drop(&mut self) {
        let ready = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.ready)
        };
        self.shared.wake.notify_all();
        for w in ready {
            w.kill();
        }
        if let Some(t) = self.filler.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use forkvm_test_support::{is_running as running, sigkill as kill};

    use super::*;

    /// A stand-in for the VM-process executable in `dir`: a shell script.
    fn stand_in(dir: &std::path::Path, script: &str) -> PathBuf {
        let exe = dir.join("forkvm-vmm");
        std::fs::write(&exe, format!("#!/bin/sh\n{script}")).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        exe
    }

    /// A stand-in that says it is prepared (REPORT_PREPARED, 3, as 8 bytes
    /// little-endian), then waits.
    fn waiter(dir: &std::path::Path) -> PathBuf {
        stand_in(
            dir,
            "printf '\\003\\000\\000\\000\\000\\000\\000\\000' >&3\nexec sleep 600\n",
        )
    }

    fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A warm-up of one vCPU that stages no home.
    fn unstaged() -> Warmup {
        Warmup {
            vcpus: 1,
            stage: None,
            jail: None,
            places: Default::default(),
            memory: None,
            devices: None,
        }
    }

    #[test]
    fn a_dead_warm_process_is_replaced_and_never_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let pool = ChildPool::start(2, unstaged(), Maker::Exec(waiter(dir.path()))).unwrap();
        wait_until("the pool to fill", || pool.pids().len() == 2);
        let before = pool.pids();
        kill(before[1]);
        wait_until("the process to die", || !running(before[1]));

        // Only the live one is handed out.
        let mut taken = pool.take().expect("a live warm process");
        assert_eq!(taken.pid(), before[0]);
        assert!(taken.is_alive());
        assert!(pool.take().is_none(), "the dead process was handed out");

        // A refill replaces both.
        pool.refill();
        wait_until("the pool to refill", || pool.pids().len() == 2);
        let after = pool.pids();
        assert!(
            !after.contains(&before[1]),
            "{after:?} has the dead {}",
            before[1]
        );
        assert!(
            !after.contains(&before[0]),
            "{after:?} has the taken {}",
            before[0]
        );
        taken.kill();
    }

    #[test]
    fn a_held_pool_fills_only_once_refilled_from_another_thread() {
        let dir = tempfile::tempdir().unwrap();
        let pool = ChildPool::start_filling(2, unstaged(), Maker::Exec(waiter(dir.path())), false)
            .unwrap();
        // Held: nothing starts while a fork's children would compete with it.
        assert_eq!(pool.wait_ready(1, Duration::from_millis(300)), 0);
        assert!(pool.take().is_none());
        let refill = pool.refiller();
        std::thread::spawn(move || refill.refill()).join().unwrap();
        assert_eq!(pool.wait_ready(2, Duration::from_secs(20)), 2);
    }

    #[test]
    fn waiting_for_warm_processes_ends_when_they_are_ready_or_time_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let pool = ChildPool::start(2, unstaged(), Maker::Exec(waiter(dir.path()))).unwrap();
        assert_eq!(
            pool.wait_ready(5, Duration::from_secs(20)),
            2,
            "capped at the size"
        );
        // Let the filler settle into waiting for a refill.
        std::thread::sleep(Duration::from_millis(100));
        let _taken = pool.take().unwrap();
        let t = Instant::now();
        assert_eq!(
            pool.wait_ready(2, Duration::from_millis(300)),
            1,
            "not refilled"
        );
        assert!(t.elapsed() >= Duration::from_millis(300));
        let none = ChildPool::start(
            1,
            unstaged(),
            Maker::Exec(PathBuf::from("/nonexistent/forkvm-vmm")),
        )
        .unwrap();
        assert_eq!(none.wait_ready(1, Duration::from_millis(200)), 0);
    }

    #[test]
    fn a_process_still_preparing_is_not_ready_and_goes_with_its_pool() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let exe = stand_in(
            dir.path(),
            &format!("echo $$ > {}\nexec sleep 600\n", pidfile.display()),
        );
        let pool = ChildPool::start(1, unstaged(), Maker::Exec(exe)).unwrap();
        wait_until("the process to start", || {
            std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
        });
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pool.wait_ready(1, Duration::from_millis(500)), 0);
        assert!(
            pool.take().is_none(),
            "a process still preparing was handed out"
        );
        assert!(running(pid));
        drop(pool);
        wait_until("the preparing process to be killed", || !running(pid));
    }

    #[test]
    fn a_process_that_dies_while_preparing_is_replaced_after_a_pause() {
        let dir = tempfile::tempdir().unwrap();
        let starts = dir.path().join("starts");
        let exe = stand_in(
            dir.path(),
            &format!("echo started >> {}\nsleep 0.2\nexit 1\n", starts.display()),
        );
        let pool = ChildPool::start(1, unstaged(), Maker::Exec(exe)).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(pool.wait_ready(1, Duration::ZERO), 0);
        let n = std::fs::read_to_string(&starts).map_or(0, |s| s.lines().count());
        assert_eq!(n, 1, "restarted {n} times in 1.5 s");
    }

    #[test]
    fn a_dropped_pool_leaves_no_process() {
        let dir = tempfile::tempdir().unwrap();
        let pool = ChildPool::start(3, unstaged(), Maker::Exec(waiter(dir.path()))).unwrap();
        wait_until("the pool to fill", || pool.pids().len() == 3);
        let pids = pool.pids();
        drop(pool);
        for pid in pids {
            assert!(!running(pid), "warm process {pid} outlived its pool");
        }
    }

    #[test]
    fn a_pool_that_cannot_start_processes_hands_out_none() {
        let pool = ChildPool::start(
            2,
            unstaged(),
            Maker::Zygote(PathBuf::from("/nonexistent/forkvm-vmm")),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(pool.take().is_none());
        assert!(pool.pids().is_empty());
    }

    #[test]
    fn the_pool_removes_the_homes_of_processes_it_kills_or_finds_dead() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let warmup = Warmup {
            vcpus: 1,
            stage: Some(Staging {
                homes: crate::launch::ChildHomes {
                    root: root.clone(),
                    parent: None,
                },
                id: forkvm_registry::new_id(),
                mem_mib: 64,
            }),
            jail: None,
            places: Default::default(),
            memory: None,
            devices: None,
        };
        let pool = ChildPool::start(2, warmup, Maker::Exec(waiter(dir.path()))).unwrap();
        wait_until("the pool to fill", || pool.pids().len() == 2);
        // The stand-in does not stage: make the homes the processes would have made.
        let staged: Vec<(u32, PathBuf)> = pool
            .shared
            .lock()
            .ready
            .iter()
            .map(|w| (w.process.pid(), w.staged.clone().expect("a staged home")))
            .collect();
        assert_ne!(staged[0].1, staged[1].1, "two processes share one ID");
        for (_, home) in &staged {
            std::fs::create_dir_all(home).unwrap();
        }

        kill(staged[0].0);
        wait_until("the process to die", || !running(staged[0].0));
        pool.refill();
        wait_until("the dead process's home to go", || !staged[0].1.exists());
        assert!(staged[1].1.exists(), "a live process's home was removed");

        drop(pool);
        assert!(!staged[1].1.exists(), "a killed process's home stayed");
    }
}
