"""``hpo worker --fuse K``: claim up to K fusable trials and train them as one group (:mod:`hpo._fused`).

Contract (what :class:`FusedGroups` guarantees on top of :mod:`hpo.worker`'s):

* trials are claimed one at a time exactly as without ``--fuse`` (a queued trial, its parameters
  asked of the sampler at claim time, so a TPE study's constant liar sees the group's earlier
  members as running and the K asks differ); each claimed trial gets its own heartbeat from the
  moment it is claimed until its own result is told;
* after the first claim the worker keeps claiming while the group has fewer than K members (and
  this worker's ``--n-trials`` allows) and the next trial can fuse with the first
  (:func:`hpo._fused.why_not_fusable` over the objective's ``may_differ``; the objective's
  ``why_not_fusable`` for the trial itself). A queued trial whose parameters are fixed before it
  is claimed (a grid point, an enqueued configuration) is claimed for the group only if they fuse
  with the first member's; it is otherwise left queued, so a grid whose batch size varies fastest
  (report 002's) still fills groups, one batch size each. The oldest queued trial still starts
  the next group, so nothing is starved. A trial drawn after its claim (an empty slot of a
  random or TPE study) that cannot fuse is not put back: it is held, beating, and starts the next
  group (or runs alone). A group of one runs as an ordinary trial;
* each member is an ordinary trial: its own intermediate values and metric history, pruning
  decision, early stopping, checkpoint, and its own final state, told the moment it leaves the
  group (a pruned member leaves; the others go on);
* the group's trainer process dying (a crash, the OOM killer) fails every member still in it with
  the cause and re-queues it (``max_retry`` as for any trial): each retry resumes from its own
  checkpoint, alone. Which member took the process down (a poison configuration) or whether the
  K members together were too big for memory is unknown; fused again, one poison member would
  fail all its group's retries until every one had used up ``max_retry``. An exception raised
  for the whole group rather than by one member (out of memory for K members together, a bug of
  the fused trainer) is handled the same way (:meth:`hpo.worker.Worker.conclude`). A group of K may run
  K times ``budget.trial_timeout``; past that, its members are failed and re-queued the same
  way, each retry alone (where the limit applies as to any trial). A member whose lease was lost
  (the database was unreachable past the grace period) stops the group, and the others are
  re-queued to resume from their checkpoints;
* claims overlap training where asking early loses nothing (grid and random samplers): near the
  end of a group (its last epoch, or its estimated rest within twice the time its own claims
  took) the worker claims and prepares the next group between the trainer's messages, and once
  the trainer reports the group done it sends the next one before telling the members that
  finished meanwhile, so neither the claims nor the results' writes leave the trainer idle. A
  member's final message is kept until then (its checkpoint is on disk: killed before telling it,
  the trial is retried from that checkpoint and ends at once with the same result). Adaptive
  samplers (TPE, BOHB, ...) claim after the group ends, so each ask sees every result before it;
* the worker killed at any line (SIGKILL included) leaves its members and its held trial RUNNING
  without heartbeats: they turn stale and are failed and re-queued by other workers, exactly as
  an unfused trial; SIGTERM/SIGINT tells the results already received, then fails and re-queues
  each of the others at once. Trials held for the next group when the worker stops for another
  reason (its failure limit) are re-queued the same way, the trainer stopped first if the group
  was already sent to it (so it never writes into a checkpoint folder a retry resumes from).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from hpo import _optuna
from hpo._fused import why_not_fusable
from hpo._interrupts import WorkerInterrupted
from hpo._lease import Heartbeat, claim_trial, inner_storage
from hpo._progress import read_counts
from hpo._rdb import RETRY_ALONE_ATTR
from hpo._recorder import Recorder
from hpo._trainer_handle import POLL_S, TrainerDied
from hpo.objective import Objective, resolve_objective
from hpo.trainer import TrialJob
from hpo.worker import _Outcome

if TYPE_CHECKING:
    from hpo.worker import Worker

# --fuse auto: one member per GiB of available memory, at most this many. Why: the digits and
# report 000 MLPs need a few MiB a member, so memory never binds on a CPU; the cap is where
# benchmarks/fused_worker.py measured the gain (per-op overhead shared K ways stops paying once
# the stacked weights leave the cache).
AUTO_MAX = 8
AUTO_BYTES_PER_MEMBER = 1 << 30
# Samplers whose asks do not depend on results, so the next group may be claimed (and its
# parameters drawn) while the current one trains without drawing them blinder.
PREFETCH_SAMPLERS = frozenset({"grid", "random"})
# Claiming the next group starts when the current one's estimated rest is within this many times
# the time its own claims took (or at its last epoch).
PREFETCH_LEAD = 2.0


def available_memory(device: str) -> int:
    """Bytes free for training on ``device``: the GPU's free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def auto_fuse(device: str) -> int:
    """K for ``--fuse auto``: a member per GiB available on ``device``, between 2 and :data:`AUTO_MAX`."""
    return max(2, min(AUTO_MAX, available_memory(device) // AUTO_BYTES_PER_MEMBER))


@dataclass
class Claim:
    """A trial this worker claimed and has not told yet: it beats until then."""

    trial_id: int
    number: int
    claimed_at: float
    heartbeat: Heartbeat
    trial: optuna.Trial | None = None
    job: TrialJob | None = None
    config: dict[str, Any] | None = None  # validated, for the fusion check
    alone: str | None = None  # why it cannot fuse with any trial, if so


@dataclass
class Forming:
    """A group being claimed, one trial at a time (:meth:`FusedGroups._grow`)."""

    members: list[Claim] = field(default_factory=list)
    complete: bool = False
    limit: int | None = None  # at most this many trials (this worker's --n-trials left)
    failed: int = 0  # claimed for it, failed while being prepared (recorded): counted in the limit
    seconds: float = 0.0  # spent claiming and preparing it


class FusedGroups:
    """The claiming and supervising of fused groups for one :class:`hpo.worker.Worker`."""

    def __init__(self, worker: Worker, size: int) -> None:
        if size < 2:
            raise ValueError(f"a fused group needs at least 2 members, not {size}")
        self.worker = worker
        self.size = size
        self.carry: Claim | None = None  # claimed, could not join the last group: starts the next
        self._held: dict[int, Claim] = {}  # claimed and not told, by number
        self._objective: Objective | None = worker.objective_object
        self.prefetches = worker.spec.sampler.name in PREFETCH_SAMPLERS
        self._next: Forming | None = None  # the next group, claimed while the current one trains
        self._sent: tuple[int, float] | None = None  # it was sent: (trainer generation, when)
        self._claim_seconds = 0.0  # the current group's claims took this long

    @property
    def holds_next(self) -> bool:
        """Whether trials are claimed for the next group (they must run, or be released)."""
        return self.carry is not None or (self._next is not None and bool(self._next.members))

    @property
    def sent_ahead(self) -> bool:
        """Whether the trainer was sent the next group already (it trains, or died training it)."""
        return self._sent is not None

    # ------------------------------------------------------------------ claiming
    def objective(self) -> Objective:
        if self._objective is None:  # the supervisor imports it only with --fuse
            w = self.worker
            self._objective = resolve_objective(
                w.objective, "stored definition", search_path=w.objective_path
            )
        return self._objective

    def _claim(self, joining: Claim | None = None) -> Claim | None:
        """Claim a queued trial; given ``joining`` (a group's first member), only one that can
        join it, as far as its fixed parameters tell (see :meth:`_could_join`)."""
        w = self.worker
        accept = None if joining is None else lambda fixed: self._could_join(joining, fixed)
        claimed = claim_trial(w.study, w.identity, accept)
        if claimed is None:
            return None
        heartbeat = Heartbeat(_optuna.study_storage(w.study), claimed[0])
        heartbeat.__enter__()
        claim = Claim(claimed[0], claimed[1], time.monotonic(), heartbeat)
        self._held[claim.number] = claim
        return claim

    def _prepare(self, claim: Claim, results: list[tuple[int, TrialState | None]]) -> bool:
        """Ask the claim's parameters; False when that failed (recorded)."""
        prepared = self.worker.prepare(claim.trial_id, claim.number)
        if isinstance(prepared, _Outcome):
            self._end(claim, prepared, results)
            return False
        claim.trial, claim.job = prepared.trial, prepared.job
        claim.alone = self._config(claim)
        why = prepared.system_attrs.get(RETRY_ALONE_ATTR)
        if why is not None:
            claim.alone = f"a retry after {why}"
        return True

    def _config(self, claim: Claim) -> str | None:
        """Sets ``claim.config``; why the trial cannot fuse at all, or None."""
        assert claim.job is not None
        config, reason = self._fusable_config(claim.job.params)
        claim.config = config
        return reason

    def _fusable_config(self, params: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """The objective's validated configuration for ``params``, and why it cannot fuse at all
        (None when it can)."""
        objective = self.objective()
        if objective.fused_train is None:
            return None, f"objective {self.worker.spec.objective} has no fused trainer"
        config = self.worker.spec.config_for(params)
        if objective.config is not None:
            try:
                config = objective.config(**config).model_dump()
            except Exception as exc:  # the trainer fails it with the full message
                return None, f"its configuration is invalid: {type(exc).__name__}"
        if objective.why_not_fusable is not None:
            return config, objective.why_not_fusable(config, self.worker.options.device)
        return config, None

    def _could_join(self, first: Claim, fixed: dict[str, Any] | None) -> bool:
        """Whether a queued trial with these fixed parameters could join ``first``'s group.

        A grid point's (or enqueued configuration's) parameters are known before claiming, so
        the group takes the queued trials that fuse with it (a grid over learning rate x batch
        size queues the batch sizes interleaved: report 002's). An empty slot's parameters are
        drawn after the claim: it is accepted, and checked once drawn. Skipped trials stay
        queued for this worker's next group or any other worker."""
        if fixed is None:
            return True
        config, reason = self._fusable_config(fixed)
        if reason is not None or config is None or first.config is None:
            return False
        return why_not_fusable([first.config, config], self.objective().may_differ) is None

    def _why_not(self, first: Claim, other: Claim) -> str | None:
        if other.alone is not None:
            return other.alone
        assert first.config is not None and other.config is not None
        return why_not_fusable([first.config, other.config], self.objective().may_differ)

    def run_next(
        self, limit: int | None, deadline: float | None = None
    ) -> list[tuple[int, TrialState | None]] | None:
        """Claim and run the next group (or lone trial); each trial's (id, state), None when no
        trial could be claimed. ``limit``: at most this many trials (this worker's ``--n-trials``);
        ``deadline``: no trial is claimed ahead after this ``time.monotonic()`` (its ``--timeout``)."""
        results: list[tuple[int, TrialState | None]] = []
        try:
            prefetched, self._next = self._next, None
            forming = prefetched if prefetched is not None and prefetched.members else Forming()
            forming.limit, forming.failed = limit, 0  # failures while prefetching were counted
            if forming.members:
                self._read_counts()
            while not forming.complete:
                first_claim = not forming.members
                self._grow(forming, results)
                if not forming.members:  # nothing queued, or the first trial could not be prepared
                    return results or None
                if first_claim:
                    self._read_counts()
            self._claim_seconds = forming.seconds
            if len(forming.members) == 1:
                self._alone(forming.members[0], results)
            else:
                self._group(forming.members, results, limit, deadline)
        except WorkerInterrupted as interrupt:
            w = self.worker
            w.trainer.stop()
            self.release(f"worker interrupted by {interrupt}")
            raise
        return results

    def _grow(self, forming: Forming, results: list[tuple[int, TrialState | None]]) -> None:
        """Claim (and prepare) one more trial for ``forming``, or find it complete.

        Its first trial is the carried one or the oldest queued; the others join while it has
        fewer than K members (and the limit allows) and the next trial can fuse with the first. A
        drawn trial that cannot is carried to start the group after (it is not put back)."""
        w = self.worker
        began = time.monotonic()
        try:
            room = self.size if forming.limit is None else min(self.size, forming.limit - forming.failed)
            first = forming.members[0] if forming.members else None
            if len(forming.members) >= room or (first is not None and first.alone is not None):
                forming.complete = True
                return
            if first is None:
                claim, self.carry = self.carry or self._claim(), None
            else:
                claim = self._claim(joining=first)
            if claim is None:
                forming.complete = True
                return
            if claim.trial is None and not self._prepare(claim, results):
                forming.failed += 1
                return
            if first is None:
                forming.members.append(claim)
                if claim.alone is not None:
                    w.say(f"trial {claim.number} runs alone: {claim.alone}")
                    forming.complete = True
                return
            reason = self._why_not(first, claim)
            if reason is not None:
                self.carry = claim
                w.say(f"trial {claim.number} starts the next group, not {first.number}'s: {reason}")
                forming.complete = True
                return
            forming.members.append(claim)
        finally:
            forming.seconds += time.monotonic() - began

    def _read_counts(self) -> None:
        w = self.worker
        storage = inner_storage(_optuna.study_storage(w.study))  # for show: never waits out an outage
        w.counts = read_counts(storage, _optuna.study_id(w.study), w.spec.n_trials, w.direction)

    def release(self, reason: str) -> None:
        """Fail and re-queue every trial still held (each resumes from its checkpoint)."""
        if self._sent is not None:
            # The trainer trains the group sent ahead: stopped before its trials are re-queued, it
            # never writes into a checkpoint folder that a retry resumes from.
            self.worker.trainer.stop()
        self.carry, self._next, self._sent = None, None, None
        for claim in list(self._held.values()):
            outcome = self.worker.record_failure(claim.trial_id, reason, retry=True, keep_checkpoint=True)
            self._end(claim, outcome, [])

    def _end(self, claim: Claim, outcome: _Outcome, results: list[tuple[int, TrialState | None]]) -> None:
        """The trial's result is told: stop its heartbeat, print its line."""
        self._held.pop(claim.number, None)
        claim.heartbeat.__exit__(None, None, None)
        self.worker.print_finished(claim.number, outcome, time.monotonic() - claim.claimed_at)
        self.worker.curves.trial_ended()
        results.append((claim.trial_id, outcome.state))

    # ------------------------------------------------------------------ training
    def _alone(self, claim: Claim, results: list[tuple[int, TrialState | None]]) -> None:
        assert claim.trial is not None and claim.job is not None
        self._end(claim, self.worker.supervise(claim.trial, claim.job), results)

    def _group(
        self,
        members: list[Claim],
        results: list[tuple[int, TrialState | None]],
        limit: int | None,
        deadline: float | None,
    ) -> None:
        w = self.worker
        by_number = {m.number: m for m in members}
        recorders = {m.number: Recorder(w.fast_study(), m.trial_id, w.say) for m in members}
        finished: dict[int, tuple[Any, ...]] = {}  # final messages kept until the next group is sent
        counts_fresh = False

        def still_in() -> list[Claim]:
            return [m for m in members if m.number in self._held and m.number not in finished]

        def tell(member: Claim, message: tuple[Any, ...]) -> None:
            nonlocal counts_fresh
            assert member.trial is not None
            if not counts_fresh:  # the study before this result, for its line
                self._read_counts()
            outcome = w.conclude(member.trial, recorders[member.number], message)
            self._end(member, outcome, results)
            # Members leaving after the same epoch share one read of the study (a read of every
            # trial, on the critical path between groups): the counts are brought forward by this
            # result instead.
            after = w.counts.after(outcome.frozen, w.direction) if w.counts and outcome.frozen else None
            w.counts, counts_fresh = (after, True) if after is not None else (w.counts, False)

        def tell_finished() -> None:
            while finished:
                number = next(iter(finished))
                tell(by_number[number], finished.pop(number))

        def retry_alone(why: str) -> None:
            """Mark the members still in so that each one's retry runs alone (before the retry is
            queued: it carries the mark). Best effort: unmarked, a retry may fuse again."""
            storage = _optuna.study_storage(w.study)
            for m in still_in():
                if not recorders[m.number].lost:
                    with contextlib.suppress(Exception):
                        storage.set_trial_system_attr(m.trial_id, RETRY_ALONE_ATTR, why)

        def end_all(reason: str, *, retry: bool) -> None:
            tell_finished()
            for m in still_in():
                if recorders[m.number].lost:
                    self._end(m, w.lost_outcome(m.number), results)
                else:
                    outcome = w.record_failure(m.trial_id, reason, retry=retry, keep_checkpoint=retry)
                    self._end(m, outcome, results)

        w.say(f"trials {', '.join(str(m.number) for m in members)} train as one fused group")
        pace = _Pace(max(m.job.max_epochs for m in members if m.job is not None))
        next_limit = None if limit is None else limit - len(members) - len(results)
        prefetch = self.prefetches and (next_limit is None or next_limit > 0)
        # budget.trial_timeout bounds one trial; K members trained together may take up to K times
        # as long (on a CPU a fused group is compute-bound), so the group gets K times the limit.
        limit_s = w.spec.budget.trial_timeout
        cap = None if limit_s is None else limit_s * len(members)
        try:
            sent, self._sent = self._sent, None
            if sent is not None:
                # Sent ahead as the last group ended, it trains already. A trainer that died since
                # (while the last group's results were told), or was replaced, died with it: as
                # any death of a group's trainer, each member fails and retries alone, counted.
                if sent[0] != w.trainer.generation:
                    raise TrainerDied(None)
                w.trainer.check_alive()
                started = sent[1]
            else:
                w.trainer.ensure_started(w.interrupts)
                started = time.monotonic()
                w.trainer.send(("group", [asdict(m.job) for m in members if m.job is not None]))
            pace.start(started)
            while True:
                w.interrupts.check()
                if cap is not None and time.monotonic() - started > cap:
                    w.trainer.kill()
                    # Which member was too slow is unknown: each retries alone (from its
                    # checkpoint), where the limit fails only a trial that exceeds it alone.
                    exceeded = (
                        f"its fused group of {len(members)} exceeded {len(members)} x budget.trial_timeout"
                    )
                    retry_alone(f"{exceeded} ({limit_s:g}s)")
                    end_all(f"{exceeded} of {limit_s:g}s; the trainer was stopped", retry=True)
                    return
                for m in still_in():
                    recorders[m.number].retry_due()
                lost = [m.number for m in still_in() if recorders[m.number].lost]
                if lost:
                    # Another worker runs that trial's retry from the same checkpoint folder: stop
                    # the group at once; the other members resume from their own checkpoints.
                    w.trainer.stop()
                    end_all(f"its fused group stopped: trial {lost[0]}'s lease was lost", retry=True)
                    return
                claiming = prefetch and self._next_wanted(pace, deadline)
                message = w.trainer.poll(0.0 if claiming else POLL_S)
                if message is None:
                    if claiming:
                        prefetch = self._prefetch_one(next_limit, results)
                    continue
                if message[0] == "group_done":
                    self._send_next(results, deadline)
                    end_all("the fused trainer ended without this trial's result", retry=False)
                    return
                if message[0] != "member":
                    continue
                member, inner = by_number[int(message[1])], tuple(message[2])
                recorder = recorders[member.number]
                kind = inner[0]
                if kind == "report":
                    recorder.report(float(inner[1]), int(inner[2]))
                    if pace.reported(int(inner[2])):  # a new epoch: others may have finished since
                        counts_fresh = False
                elif kind == "should_prune":
                    answer = ("abort",) if recorder.lost else ("prune", recorder.should_prune())
                    w.trainer.send(answer)
                elif kind == "user_attr":
                    recorder.user_attr(str(inner[1]), inner[2])
                elif kind == "system_attr":
                    recorder.system_attr(str(inner[1]), inner[2])
                elif kind == "artifact":
                    assert member.trial is not None
                    w.trainer.send(w.upload(member.trial, str(inner[1])))
                elif member.number in self._held and member.number not in finished:
                    # Its last message: it leaves the group. While the next group is being
                    # claimed, told once that group is sent (the trainer is not kept waiting).
                    if self._next is not None:
                        finished[member.number] = inner
                    else:
                        tell(member, inner)
        except WorkerInterrupted:
            tell_finished()  # results already here are told, not re-queued
            raise
        except TrainerDied as died:
            w.trainer.close()
            for m in still_in():
                recorders[m.number].drain_blocking(w.storage_patience, w.interrupts)
            retry_alone(f"its fused group's trainer died ({died})")
            end_all(str(died), retry=True)

    # ------------------------------------------------------------------ the next group, early
    def _next_wanted(self, pace: _Pace, deadline: float | None) -> bool:
        """Whether to claim for the next group now: it is not complete, the worker's deadline has
        not passed (a group claimed ahead runs after it), and the current group is at its last
        epoch or its estimated rest is within PREFETCH_LEAD times its claims' time."""
        if self._next is not None and self._next.complete:
            return False
        if deadline is not None and time.monotonic() >= deadline:
            return False
        rest = pace.rest()
        return rest is not None and rest <= PREFETCH_LEAD * self._claim_seconds

    def _prefetch_one(self, limit: int | None, results: list[tuple[int, TrialState | None]]) -> bool:
        """Claim one trial for the next group; False to claim no more while this group trains."""
        if self._next is None:
            self._next = Forming(limit=limit)
        self._grow(self._next, results)
        if not self._next.members and (self._next.failed or self._next.complete):
            # Nothing queued, or its first trial failed to prepare: claimed after this group,
            # where the worker's loop sees that failure first.
            self._next = None
            return False
        return True

    def _send_next(self, results: list[tuple[int, TrialState | None]], deadline: float | None) -> None:
        """The group is done: complete the next group's claims, if begun (none more once the
        worker's deadline has passed), and send it ahead."""
        forming = self._next
        if forming is None:
            return
        if deadline is not None and time.monotonic() >= deadline:
            forming.complete = True  # the trials claimed already run; no more are taken
        while not forming.complete:
            self._grow(forming, results)
            if not forming.members and forming.failed:
                self._next = None  # its first trial failed to prepare: run_next starts afresh
                return
        if not forming.members:
            self._next = None
        elif len(forming.members) > 1:
            jobs = [asdict(m.job) for m in forming.members if m.job is not None]
            self.worker.trainer.send(("group", jobs))
            self._sent = (self.worker.trainer.generation, time.monotonic())


class _Pace:
    """A group's progress in epochs, for when to claim the next group."""

    def __init__(self, max_epochs: int) -> None:
        self.max_epochs = max_epochs
        self.started = time.monotonic()
        self.first: int | None = None  # the first epoch reported in this group
        self.last = 0

    def start(self, when: float) -> None:
        self.started = when

    def reported(self, epoch: int) -> bool:
        """Note an epoch's report; True when it is the first report of that epoch."""
        if self.first is None:
            self.first = epoch
        if epoch <= self.last:
            return False
        self.last = epoch
        return True

    def rest(self) -> float | None:
        """Estimated seconds left (0 at the last epoch), None before any report. Resumed
        members re-report their restored epochs at once, so this errs early, never late."""
        if self.first is None:
            return None
        left = self.max_epochs - self.last
        if left <= 1:
            return 0.0
        per_epoch = (time.monotonic() - self.started) / (self.last - self.first + 1)
        return left * per_epoch
