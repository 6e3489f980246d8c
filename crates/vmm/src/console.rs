//! The host side of the serial console: host stdin feeds the guest UART (in raw mode when
//! it is a terminal, restored on drop).

use std::io::{IsTerminal, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use forkvm_devices::legacy::Serial;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

/// Copies host stdin into the guest UART.
pub struct ConsoleInput {
    serial: Arc<Mutex<Serial>>,
    raw_terminal: bool,
}

impl ConsoleInput {
    /// Feeds `serial` from stdin; puts a terminal stdin in raw mode.
    pub fn new(serial: Arc<Mutex<Serial>>) -> Self {
        let stdin = std::io::stdin();
        let raw_terminal = stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok();
        Self {
            serial,
            raw_terminal,
        }
    }
}

impl Drop for ConsoleInput {
    fn drop(&mut self) {
        if self.raw_terminal {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if let Err(e) = ops.add(event_manager::Events::new(&stdin, EventSet::IN)) {
            tracing::debug!("console input unavailable: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        let mut serial = self.serial.lock().expect("serial lock poisoned");
        let room = serial.input_capacity().min(buf.len());
        let n = if room == 0 {
            // The guest is not reading; drop nothing, wait for room.
            return;
        } else {
            stdin.lock().read(&mut buf[..room])
        };
        match n {
            Ok(0) | Err(_) => {
                // EOF or a closed stdin: stop watching it.
                let _ = ops.remove(Events::new_raw(stdin.as_raw_fd(), events.event_set()));
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
        }
    }
}
