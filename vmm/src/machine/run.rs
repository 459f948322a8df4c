//! The run loop: one thread per vCPU, the device event loop on the calling thread
//! until something ends the run, then the end-of-run plan (`epoch::ending`).

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock_recover;
use event_manager::SubscriberOps;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vmm_sys_util::eventfd::EventFd;

use super::adapters::{Gate, KvmDirtyLog, KvmState, KvmVcpus, Stores};
use super::api::{ApiControl, SinkKind};
use super::control::Control;
use super::{HandedOver, Machine, RunEnd, VmmError, FINAL_CHECKPOINT_DEADLINE, VCPU_STOP_DEADLINE};
use crate::checkpoint::{DiskManifest, Manifest};
use crate::epoch::exporter::{ExportWorker, Exporter};
use crate::epoch::{ending, EpochEngine, EpochLoop, Parts, Phase};
use crate::terminal::{EscapeDecoder, RawTerminal};
use crate::vcpu::{VcpuControl, VcpuStop};

fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Os { what, source }
}

impl Machine {
    /// Runs the guest until something ends the run; see [`RunEnd`].
    pub fn run(mut self) -> Result<RunEnd, VmmError> {
        // SIGINT and SIGTERM are blocked on this thread before any vCPU thread exists,
        // so every thread inherits the mask and the signals are only ever read from
        // the signalfd by the event loop.
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGINT);
        mask.add(Signal::SIGTERM);
        let mut old_mask = SigSet::empty();
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), Some(&mut old_mask))
            .map_err(|e| VmmError::Os {
                what: "the signal mask",
                source: e.into(),
            })?;
        let result = self.run_blocked(mask);
        let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
        result
    }

    /// The one-time facts of this machine, for its checkpoint sink.
    fn manifest(&self) -> Manifest {
        Manifest {
            memory: self.memory_size,
            cpus: u8::try_from(self.vcpus.len()).unwrap_or(u8::MAX),
            cmdline: self.cmdline.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskManifest {
                    config: crate::config::DiskConfig {
                        path: d.path.clone(),
                        readonly: d.readonly,
                        checkpoint: d.store.is_some(),
                        // The journal exists: reopening it uses its own size.
                        region_size: None,
                    },
                    size: d.size,
                    journal_id: d.store.as_ref().map(|s| s.lock().file_header().journal_id),
                    region_size: d
                        .store
                        .as_ref()
                        .map(|s| s.lock().file_header().region_capacity),
                })
                .collect(),
            cpu: self.guest_cpu(),
        }
    }

    /// The CPU the guest sees (vCPU 0's CPUID and TSC frequency).
    fn guest_cpu(&self) -> crate::cpuid::GuestCpu {
        let Some(v) = self.vcpus.first() else {
            return Default::default();
        };
        let cpuid = v
            .fd()
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map(|c| c.as_slice().to_vec())
            .unwrap_or_default();
        crate::cpuid::GuestCpu::of(&cpuid, v.fd().get_tsc_khz().ok())
    }

    /// Builds and starts the epoch engine on the device loop, if checkpointing.
    fn start_engine(
        &mut self,
        controls: &[Arc<VcpuControl>],
        held: &Arc<AtomicBool>,
    ) -> Result<Option<Arc<Mutex<EpochLoop>>>, VmmError> {
        let Some(cp) = self.checkpointing.take() else {
            return Ok(None);
        };
        let manifest = self.manifest();
        let stores = Stores {
            stores: self
                .disks
                .iter()
                .enumerate()
                .filter_map(|(i, d)| d.store.clone().map(|s| (i, s)))
                .collect(),
            blocks: self.disks.iter().map(|d| d.block.clone()).collect(),
        };
        let hot = crate::dirty::HotConfig::from_env(
            crate::epoch::Pacer::new(cp.config.epoch).current(),
            || crate::fault_probe::host_fault_ns(&self.kvm),
        );
        let parts = Parts {
            vcpus: Box::new(KvmVcpus {
                controls: controls.to_vec(),
                held: held.clone(),
            }),
            dirty: Box::new(
                KvmDirtyLog::new(self.vm.clone(), self.mem.clone(), hot)
                    .map_err(VmmError::DirtyTracking)?,
            ),
            state: Box::new(KvmState {
                vm: self.vm.clone(),
                vcpus: controls.to_vec(),
                serial: self.serial.clone(),
                i8042: self.i8042.clone(),
                disks: self
                    .disks
                    .iter()
                    .map(|d| (d.block.clone(), d.transport.clone()))
                    .collect(),
            }),
            disks: Box::new(stores.clone()),
            output: Box::new(Gate(self.gate.clone())),
        };
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("the exporter eventfd"))?;
        let worker = ExportWorker::new(cp.sink, Box::new(stores));
        let exporter = Exporter::spawn(
            worker,
            wake.try_clone().map_err(os_err("the exporter eventfd"))?,
        )?;
        let metrics: Option<Box<dyn Write + Send>> = match &cp.config.metrics {
            Some(p) => Some(Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|source| VmmError::Os {
                    what: "the metrics file",
                    source,
                })?,
            ))),
            None => None,
        };
        let mut engine = EpochEngine::new(
            parts,
            Box::new(exporter),
            self.mem.clone(),
            cp.first_epoch,
            metrics,
        );
        engine.set_lineage(cp.lineage);
        self.lineage = Some(cp.lineage);
        // A standby's initial copy crosses a network while the guest runs: iterate
        // it, so the first cut carries little. A local directory is written fast
        // enough that one pass suffices.
        if let Some(t) = cp.telemetry {
            engine.set_telemetry(t);
        }
        engine.set_epoch_length(cp.config.epoch);
        engine.set_page_cost(std::time::Duration::from_nanos(hot.costs.fault_ns));
        if matches!(
            cp.config.sink,
            crate::config::SinkConfig::Peer(_) | crate::config::SinkConfig::Await(_)
        ) {
            engine.set_precopy_rounds(crate::epoch::PRECOPY_MAX_ROUNDS);
        }
        if let crate::config::SinkConfig::Await(_) = cp.config.sink {
            engine.start_unprotected(manifest, cp.resumed_from);
        } else {
            engine.start(manifest)?;
        }
        let cut_request = cp
            .cut_request
            .try_clone()
            .map_err(os_err("the cut-request eventfd"))?;
        let s = self.shutdown.clone();
        let lp = EpochLoop::new(
            engine,
            wake,
            Some(cut_request),
            Box::new(move |msg| s.request(RunEnd::GuestError(msg))),
        )?;
        let lp = Arc::new(Mutex::new(lp));
        self.events.add_subscriber(lp.clone());
        if let Some((listener, session)) = cp.joins {
            let joins = super::joins::Joins::start(
                listener,
                session,
                cp.fence,
                self.gate.released_epoch(),
                cp.lineage,
                lp.clone(),
            )?;
            self.events.add_subscriber(Arc::new(Mutex::new(joins)));
        }
        Ok(Some(lp))
    }

    fn run_blocked(&mut self, mask: SigSet) -> Result<RunEnd, VmmError> {
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| VmmError::Os {
            what: "the signalfd",
            source: e.into(),
        })?;
        let _raw = if self.attach_stdin {
            RawTerminal::stdin()
        } else {
            None
        };
        let control = Arc::new(Mutex::new(Control {
            shutdown: self.shutdown.clone(),
            signals,
            serial: self.serial.clone(),
            stdin: self.attach_stdin,
            escape: EscapeDecoder::default(),
        }));
        self.events.add_subscriber(control);

        // Everything that can fail is set up before any guest code runs.
        let controls: Vec<Arc<VcpuControl>> = self
            .vcpus
            .iter()
            .map(|v| VcpuControl::new(v.index()))
            .collect();
        let sink = match self.checkpointing.as_ref().map(|c| &c.config.sink) {
            None => SinkKind::None,
            Some(crate::config::SinkConfig::Directory(_)) => SinkKind::Directory,
            Some(crate::config::SinkConfig::Peer(p)) => SinkKind::Peer(p.addr.clone()),
            Some(crate::config::SinkConfig::Await(_)) => SinkKind::None,
        };
        let paused = Arc::new(AtomicBool::new(false));
        let engine = self.start_engine(&controls, &paused)?;
        if let Some(endpoint) = &self.api {
            let (backend, inbox) = crate::api::link().map_err(os_err("the API eventfd"))?;
            self.events.add_subscriber(Arc::new(Mutex::new(ApiControl {
                inbox,
                engine: engine.clone(),
                controls: controls.clone(),
                paused,
                shutdown: self.shutdown.clone(),
                gate: self.gate.clone(),
                sink,
                taken_over: self.taken_over,
                memory_bytes: self.memory_size,
            })));
            endpoint.set(Arc::new(backend));
        }

        let (done_tx, done_rx) = mpsc::channel::<u8>();
        let mut threads = Vec::new();
        for (mut vcpu, control) in self.vcpus.drain(..).zip(controls.iter().cloned()) {
            let (shutdown, done) = (self.shutdown.clone(), done_tx.clone());
            let index = vcpu.index();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    if let VcpuStop::GuestError(msg) = vcpu.run(&control) {
                        shutdown.request(RunEnd::GuestError(msg));
                    }
                    let _ = done.send(index);
                    vcpu
                })
                .map_err(os_err("a vCPU thread"))?;
            threads.push(handle);
        }
        if let Some(f) = self.on_running.take() {
            f();
        }
        let loop_result = loop {
            if self.shutdown.reason().is_some() {
                break Ok(());
            }
            if let Err(e) = self.events.run_with_timeout(100) {
                break Err(VmmError::EventLoop(e));
            }
        };
        if let Err(e) = &loop_result {
            self.shutdown.request(RunEnd::GuestError(format!("{e}")));
        }
        if let Some(endpoint) = &self.api {
            endpoint.set(Arc::new(crate::api::Unavailable("the run is ending")));
        }
        let why = self.shutdown.reason().unwrap_or(RunEnd::Quit);

        // How the run ends: see epoch::ending for the whole table.
        let phase: Option<Phase> = engine.as_ref().map(|e| lock_recover(e).engine().phase());
        let mut plan = ending::plan(&why, loop_result.is_ok(), phase);
        let mut final_result = Ok(());
        let mut sink = None;
        let mut final_epoch = None;
        let mut paused_at = None;
        if let Some(e) = &engine {
            let mut lp = lock_recover(e);
            let engine = lp.engine();
            if plan.final_checkpoint {
                match engine.finish(FINAL_CHECKPOINT_DEADLINE) {
                    Ok(epoch) => {
                        tracing::info!("final checkpoint {epoch} written");
                        final_epoch = Some(epoch);
                        paused_at = engine.last_cut_began();
                    }
                    Err(err) => {
                        plan = ending::after_failed_final();
                        final_result = Err(VmmError::Epoch(err));
                    }
                }
            } else {
                engine.shutdown(FINAL_CHECKPOINT_DEADLINE);
            }
            // Fenced or failed while ending: leave everything for the last complete
            // checkpoint after all.
            if matches!(engine.phase(), Phase::Fenced | Phase::Failed) {
                plan = ending::after_failed_final();
            }
            // Nothing runs on the disks or the sink behind our back from here on.
            sink = engine.stop();
        }

        // Stop the vCPUs: set every stop flag, then kick until each thread reports.
        let deadline = Instant::now() + VCPU_STOP_DEADLINE;
        let mut running: Vec<bool> = vec![true; threads.len()];
        while running.iter().any(|r| *r) {
            for (c, r) in controls.iter().zip(&running) {
                if *r {
                    c.request_stop();
                }
            }
            match done_rx.recv_timeout(Duration::from_millis(10)) {
                Ok(i) => {
                    if let Some(r) = running.get_mut(usize::from(i)) {
                        *r = false;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() > deadline {
                let stuck = running.iter().position(|r| *r).unwrap_or(0);
                return Err(VmmError::VcpuStuck(
                    u8::try_from(stuck).unwrap_or(u8::MAX),
                    VCPU_STOP_DEADLINE,
                ));
            }
        }
        for h in threads {
            if let Ok(v) = h.join() {
                self.vcpus.push(v);
            }
        }

        // The sink hears of the end first: a standby that was told never resumes,
        // so only then may the rest of the output be shown and the disks settled.
        if let (Some(sink), Some(how)) = (sink.as_mut(), &plan.sink_end) {
            match sink.end(how) {
                Ok(()) if *how == crate::checkpoint::sink::SinkEnd::Handover => {
                    if let (Some(t), Some(epoch)) = (paused_at, final_epoch) {
                        eprintln!(
                            "mirrorvm: switchover: handed the guest over at checkpoint {epoch}: {:.1} ms from the final pause to the standby's confirmation",
                            t.elapsed().as_secs_f64() * 1e3
                        );
                    }
                    if let (Some(f), Some(epoch), Some(lineage)) =
                        (self.on_handover.take(), final_epoch, self.lineage)
                    {
                        f(HandedOver {
                            memory: self.mem.clone(),
                            manifest: self.manifest(),
                            replica: crate::checkpoint::ReplicaId { lineage, epoch },
                            rejoin: sink.rejoin_addr(),
                        });
                    }
                }
                Ok(()) => {}
                // The standby may still resume and this host cannot record that it
                // goes on alone: show and settle nothing more.
                Err(e @ crate::checkpoint::SinkError::Fenced(_)) => {
                    eprintln!("mirrorvm: {}", devices::ErrorChain(&e));
                    plan = ending::after_failed_final();
                }
                Err(e) => tracing::warn!(
                    "cannot record the end of the run at the checkpoint sink: {}",
                    devices::ErrorChain(&e)
                ),
            }
        }
        if plan.release_output {
            self.gate.open();
        }
        let _ = lock_recover(&self.serial).output_mut().flush();
        // The base images alone then hold the guest's disk.
        if plan.retire_disks {
            for d in &self.disks {
                if let Some(store) = &d.store {
                    crate::disk::commit_all(&mut store.lock()).map_err(|source| {
                        VmmError::DiskShutdown {
                            path: d.path.display().to_string(),
                            source,
                        }
                    })?;
                }
            }
        }
        final_result?;
        loop_result?;
        Ok(why)
    }
}
