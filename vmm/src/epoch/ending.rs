//! How a run ends, decided in one place from why it ended and where the engine is.
//!
//! | why / where | final checkpoint | release held output | retire disks into their bases | sink records |
//! | --- | --- | --- | --- | --- |
//! | no checkpoints at all | – | yes (the gate is open) | yes | – |
//! | the user stopped it (signal, Ctrl-A x) | yes, vCPUs parked | if the final one landed | no: the disks are at the final checkpoint | stopped |
//! | the user handed it to the standby (switchover) | yes, vCPUs parked | if the final one landed | no: the disks are at the final checkpoint | handover |
//! | the guest ended it (exit, reset, error) | no; the one in flight may land | yes | yes: the base images alone hold the disk | finished |
//! | the run failed (a cut, a disk commit, the event loop) | no | no: it belongs to checkpoints that never completed | no: the journals keep the regions for recovery | – |
//! | unprotected (the sink is lost) | no | yes | yes, locally | – |
//! | fenced (another host runs the guest) | no | never | never | – |

use super::Phase;
use crate::checkpoint::sink::SinkEnd;
use crate::run_end::RunEnd;

/// What to do at the end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// Cut one final checkpoint with the vCPUs parked.
    pub final_checkpoint: bool,
    /// Release held console output (after the final checkpoint, if any, landed).
    pub release_output: bool,
    /// Retire every disk region into its base image.
    pub retire_disks: bool,
    /// What the sink records.
    pub sink_end: Option<SinkEnd>,
}

/// The plan for a run that ended for `why` (`loop_ok`: the device loop did not fail)
/// with the engine at `phase` (`None`: no checkpoints).
pub fn plan(why: &RunEnd, loop_ok: bool, phase: Option<Phase>) -> Ending {
    let local = Ending {
        final_checkpoint: false,
        release_output: true,
        retire_disks: true,
        sink_end: None,
    };
    match phase {
        // No checkpoints (the gate is open), or unprotected: settle everything here.
        None | Some(Phase::Unprotected { .. }) => local,
        // Fenced, failed, or a device loop that failed: leave everything as it is.
        Some(Phase::Fenced | Phase::Failed) => after_failed_final(),
        Some(_) if !loop_ok => after_failed_final(),
        Some(_) if why.is_user_stop() => Ending {
            final_checkpoint: true,
            release_output: true,
            retire_disks: false,
            sink_end: Some(if *why == RunEnd::Switchover {
                SinkEnd::Handover
            } else {
                SinkEnd::Stopped {
                    exit_status: why.exit_code(),
                }
            }),
        },
        Some(_) => Ending {
            sink_end: Some(SinkEnd::Finished {
                how: format!("{why:?}"),
                exit_status: why.exit_code(),
            }),
            ..local
        },
    }
}

/// Leave disks and held output as they are, for the last complete checkpoint: after
/// a failed final checkpoint, a failure, or a fence.
pub fn after_failed_final() -> Ending {
    Ending {
        final_checkpoint: false,
        release_output: false,
        retire_disks: false,
        sink_end: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_of_the_table() {
        let exit = RunEnd::GuestExit(0);
        let stop = RunEnd::Signal(15);
        let idle = Some(Phase::Idle);

        let none = plan(&exit, true, None);
        assert!(none.release_output && none.retire_disks && none.sink_end.is_none());

        let s = plan(&stop, true, idle);
        assert!(s.final_checkpoint && !s.retire_disks);
        assert!(matches!(s.sink_end, Some(SinkEnd::Stopped { .. })));

        let g = plan(&exit, true, idle);
        assert!(!g.final_checkpoint && g.release_output && g.retire_disks);
        assert_eq!(
            g.sink_end,
            Some(SinkEnd::Finished {
                how: "GuestExit(0)".into(),
                exit_status: 0
            })
        );

        for p in [Phase::Failed, Phase::Fenced] {
            for why in [&exit, &stop] {
                let e = plan(why, true, Some(p));
                assert!(!e.release_output && !e.retire_disks && !e.final_checkpoint);
            }
        }
        let bad_loop = plan(&stop, false, idle);
        assert!(!bad_loop.final_checkpoint && !bad_loop.release_output);

        let u = plan(&stop, true, Some(Phase::Unprotected { since: Some(3) }));
        assert!(u.release_output && u.retire_disks && !u.final_checkpoint);

        let h = plan(&RunEnd::Switchover, true, idle);
        assert!(h.final_checkpoint && h.release_output && !h.retire_disks);
        assert_eq!(h.sink_end, Some(SinkEnd::Handover));
        // Without a standby there is nothing to hand over to: settled locally.
        let hu = plan(
            &RunEnd::Switchover,
            true,
            Some(Phase::Unprotected { since: None }),
        );
        assert!(hu.sink_end.is_none() && hu.retire_disks);

        let f = after_failed_final();
        assert!(!f.release_output && !f.retire_disks);
    }
}
