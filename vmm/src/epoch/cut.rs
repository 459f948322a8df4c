//! How a cut works: the steps inside one pause of every vCPU, in their order.

use std::time::{Duration, Instant};

use super::{us, CutError, EpochEngine, EpochError, EpochMetrics, Job, PauseError, Phase};
use crate::checkpoint::{encode_state, Checkpoint, Console};
use crate::dirty::Protect;

impl EpochEngine {
    /// Cuts checkpoint `next_epoch`; with `resume` false the vCPUs stay parked (the
    /// final checkpoint of a run). A failure leaves the engine [`Phase::Failed`]: a
    /// failed cut may have harvested (and so cleared) dirty logs whose pages no
    /// checkpoint holds, so no later checkpoint may be cut in this run.
    pub(super) fn cut(&mut self, resume: bool) -> Result<(), EpochError> {
        let epoch = self.next_epoch;
        if matches!(self.phase, Phase::Failed) {
            return Err(EpochError::AfterFailure(epoch));
        }
        if matches!(self.phase, Phase::Fenced | Phase::Unprotected { .. }) {
            return Ok(());
        }
        let r = self.cut_inner(epoch, resume);
        if r.is_err() {
            self.phase = Phase::Failed;
            #[cfg(test)]
            if self.sabotage.cut_after_failure {
                self.phase = Phase::Idle;
            }
        }
        r
    }

    fn cut_inner(&mut self, epoch: u64, resume: bool) -> Result<(), EpochError> {
        let full = self.need_full;
        let t0 = Instant::now();
        // 1. Pause: kick every vCPU out of KVM_RUN and wait until all are parked.
        match self.parts.vcpus.pause() {
            Ok(()) => {}
            Err(PauseError::Exited(_)) => {
                // A vCPU whose thread ended is ending the run for its own reason
                // (which it reports); nothing was harvested, so nothing is lost.
                self.parts.vcpus.resume();
                return Ok(());
            }
            Err(source) => {
                self.parts.vcpus.resume();
                return Err(EpochError::Pause { epoch, source });
            }
        }
        let t_kick = t0.elapsed();
        let staged = self.capture(epoch);
        // Resume whatever happened (the guest must not stay paused), unless this is
        // the run's final checkpoint and it succeeded.
        #[cfg(test)]
        let resume = resume && !self.sabotage.stay_paused;
        if resume || staged.is_err() {
            self.parts.vcpus.resume();
        }
        let pause = t0.elapsed();
        let Captured {
            set,
            pages,
            state,
            region_bytes,
            console,
            hot_pages,
            t_harvest,
            t_copy,
            t_save,
            #[cfg(test)]
            deferred,
        } = staged.map_err(|source| EpochError::Cut { epoch, source })?;
        #[cfg(test)]
        if let Some(set) = deferred {
            // The sabotage: re-protect only now, with the vCPUs running again.
            self.parts
                .dirty
                .protect(&set, Protect::Hot)
                .map_err(|source| EpochError::Cut { epoch, source })?;
        }
        // What changed since the last complete checkpoint, for a standby that may
        // rejoin with its replica (outside the pause).
        self.pending.union(&set);
        self.pending.union(&std::mem::take(&mut self.since_cut));
        // Encoding needs no pause.
        let state = encode_state(&state).map_err(|e| EpochError::Cut {
            epoch,
            source: CutError::Encode(e),
        })?;
        // Pages rewritten since the previous checkpoint (the epoch length policy),
        // counted after the resume. A full checkpoint starts the count afresh.
        let rewritten_pages = if full {
            0
        } else {
            super::length::common_pages(&self.last_pages, &pages.addrs)
        };
        self.last_pages.clone_from(&pages.addrs);
        let m = EpochMetrics {
            epoch,
            full,
            rewritten_pages,
            pause_us: us(pause),
            kick_us: us(t_kick),
            harvest_us: us(t_harvest),
            copy_us: us(t_copy),
            save_us: us(t_save),
            dirty_pages: pages.len() as u64,
            hot_pages,
            region_bytes,
            epoch_us: self.last_cut.map_or(0, |c| us(t0.duration_since(c.began))),
            at_ms: self.ms_since_start(),
            ..Default::default()
        };
        if full {
            tracing::info!(
                "checkpoint {epoch} completes the base: {} pages, pause {} µs",
                pages.len(),
                m.pause_us
            );
        }
        #[cfg(test)]
        if self.sabotage.retire_early {
            self.exporter.submit(Job::Retire(epoch));
        }
        self.exporter.submit(Job::Checkpoint {
            checkpoint: Checkpoint {
                epoch,
                full,
                state,
                pages,
                disks: Vec::new(),
                console,
            },
            sealed: false,
        });
        self.last_cut = Some(super::LastCut {
            epoch,
            began: t0,
            pause,
        });
        self.in_flight = Some(m);
        self.need_full = false;
        self.next_epoch += 1;
        self.phase = Phase::Exporting { epoch };
        #[cfg(test)]
        {
            if self.sabotage.release_early {
                self.parts.output.release(epoch);
            }
        }
        Ok(())
    }

    /// Steps 2–7, with every vCPU parked and the device loop stopped (the caller is
    /// the device loop).
    fn capture(&mut self, epoch: u64) -> Result<Captured, CutError> {
        // 2. Devices process pending queue notifications, so none is lost.
        self.parts.state.drain();
        // 3. Harvest: read KVM's log ∪ the VMM's own writes (reading clears ours,
        //    not KVM's).
        let t1 = Instant::now();
        #[allow(unused_mut)]
        let mut set = self.parts.dirty.read()?;
        #[cfg(test)]
        if self.sabotage.lose_a_page {
            super::model_test::drop_highest(&mut set);
        }
        // 4. Re-protect every dirty page but the hot ones. The ordering rule: this
        //    completes before the pages are copied and before the vCPUs resume, so
        //    the copy holds every write made before it, and every later write
        //    faults and is logged (or lands on a hot page, which stays in the log).
        #[cfg(test)]
        let deferred = self.sabotage.protect_after_resume.then(|| set.clone());
        #[cfg(test)]
        let hot_pages = if deferred.is_some() {
            0
        } else {
            self.parts.dirty.protect(&set, Protect::Hot)?
        };
        #[cfg(not(test))]
        let hot_pages = self.parts.dirty.protect(&set, Protect::Hot)?;
        let t_harvest = t1.elapsed();
        // 5. Copy the dirty pages (hot ones included) to staging: the guest resumes
        //    before they travel.
        let t2 = Instant::now();
        let mut pages = std::mem::take(&mut self.spare);
        self.parts.dirty.copy(&set, &mut pages)?;
        let t_copy = t2.elapsed();
        // 6. Save devices (their drained work may have raised interrupts), then
        //    vCPUs (LAPICs), then the VM (IOAPIC, PICs, PIT, clock).
        let t3 = Instant::now();
        let state = self.parts.state.save()?;
        // 7. Swap the disks' regions: later writes land in the new ones. Then seal
        //    the console output of this epoch. Both inside the pause, so no guest
        //    write or output straddles the cut.
        let region_bytes = self.parts.disks.start_checkpoint(epoch)?;
        let console = self.parts.output.seal(epoch);
        Ok(Captured {
            set,
            pages,
            state,
            region_bytes,
            console,
            hot_pages,
            t_harvest,
            t_copy,
            t_save: t3.elapsed(),
            #[cfg(test)]
            deferred,
        })
    }
}

/// What the steps inside the pause produced.
struct Captured {
    set: crate::dirty::DirtySet,
    pages: crate::dirty::StagedPages,
    state: crate::checkpoint::MachineState,
    region_bytes: u64,
    console: Console,
    hot_pages: u64,
    t_harvest: Duration,
    t_copy: Duration,
    t_save: Duration,
    /// The sabotage `protect_after_resume`: the set to re-protect after the resume.
    #[cfg(test)]
    deferred: Option<crate::dirty::DirtySet>,
}
