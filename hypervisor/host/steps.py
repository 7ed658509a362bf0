"""Multi-step protocols as sequences of named atomic steps, run eagerly or queued.

A *protocol* (a sender's delivery to each target, a kick, a block) is a generator that yields
:class:`Step` values: each names one atomic access to shared state, declares what it reads and
writes (names such as ``"irr[3]"``, ``"run_state[3]"``, ``"pcpu[1].loaded"``) and carries
``run``, the callable that performs it.  The value ``run()`` returns is sent back into the
generator, which then yields the next step; what the generator returns is the protocol's
result.  Code between two ``yield``\\ s must not touch shared state: every shared access is
inside some step, which is what makes the steps the units an interleaving may reorder.

:class:`Steps` runs protocols.  EAGER (the default) means the caller performs the protocol at
once; the hot paths do not even build the generator (they call the same step functions
directly, so eager runs allocate nothing per step).  QUEUED (``steps.queued = True``) means
:meth:`Steps.start` parks the protocol as a :class:`Thread`; a test or an explorer then picks
which thread's next step runs (:meth:`Steps.step`), so the steps of several senders and
targets interleave in any chosen order.  A protocol started while a queued step runs (a kick
started by an IRR write, say) continues the running thread, as a call would: it runs before
the rest of its caller.  The order taken is kept (``history``) and replays with
:meth:`Steps.replay`; :func:`explore` enumerates every order by replaying prefixes.

The pattern follows the barrier pairings in KVM (``kvm_vcpu_block`` vs ``kvm_vcpu_kick``,
``avic_vcpu_blocking``, ``pi_enable_wakeup_handler``) made executable, in the style of CHESS
and TLC: ``specs/steps.md`` has the rules (STEP-*) and the halt vs. IPI worked example.

Not modelled: memory-ordering weaker than sequential consistency (each step is atomic and
steps are totally ordered), timing.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

from lapic.faults import ApicValueError

Protocol = Generator["Step", object, object]
"""A protocol instance: yields steps, receives each step's ``run()`` value, returns a result."""


@dataclass(frozen=True, slots=True)
class Step:
    """One atomic step: ``run()`` performs it; ``reads``/``writes`` name the shared state."""

    name: str
    reads: frozenset[str]
    writes: frozenset[str]
    run: Callable[[], object] = field(compare=False, repr=False)

    def conflicts(self, other: Step) -> bool:
        """Whether the order of the two steps can matter (one writes what the other uses)."""
        return bool(
            self.writes & (other.reads | other.writes) or other.writes & self.reads
        )


class Thread:
    """One queued protocol (plus the protocols it started): a stack of generators."""

    __slots__ = ("_frames", "_root", "done", "name", "result", "steps_run")

    def __init__(self, name: str) -> None:
        self.name = name
        self._root: object = None
        self._frames: list[list[object]] = []  # [generator, its pending Step]
        self.done = False
        self.result: object = None
        self.steps_run: list[str] = []

    @property
    def next_step(self) -> Step | None:
        """The step this thread runs next (None when done)."""
        if not self._frames:
            return None
        step = self._frames[-1][1]
        assert isinstance(step, Step)
        return step

    def __repr__(self) -> str:
        nxt = self.next_step
        return f"<Thread {self.name} next={nxt.name if nxt else 'done'}>"


class Steps:
    """The step scheduler of one host.  Eager unless ``queued`` is set."""

    def __init__(self) -> None:
        self.queued = False
        """False: protocols run at once (today's results).  True: they wait in ``threads``."""
        self.threads: list[Thread] = []
        self.history: list[tuple[str, str]] = []
        """``(thread name, step name)`` of every queued step run, in order."""
        self._running: Thread | None = None
        self._serial = 0

    # -- starting protocols ------------------------------------------------------------------
    def start(self, name: str, protocol: Protocol) -> Thread:
        """Queue ``protocol``; inside a running step it continues that step's thread."""
        thread = self._running
        if thread is None:
            self._serial += 1
            thread = Thread(f"{name}#{self._serial}")
            self.threads.append(thread)
        self._push(thread, protocol)
        return thread

    def spawn(self, name: str, protocol: Protocol) -> Thread:
        """Queue ``protocol`` as a thread of its own, even inside a running step: work the
        started code does later in another context (VMX arms the wake-up vector at the
        schedule-out that follows the halt's re-check, not inside it)."""
        self._serial += 1
        thread = Thread(f"{name}#{self._serial}")
        self.threads.append(thread)
        self._push(thread, protocol)
        return thread

    @staticmethod
    def run_now(protocol: Protocol) -> object:
        """Run ``protocol`` to completion at once (eager); returns its result."""
        try:
            step = next(protocol)
            while True:
                step = protocol.send(step.run())
        except StopIteration as stop:
            return stop.value

    def _push(self, thread: Thread, protocol: Protocol) -> None:
        if thread._root is None:
            thread._root = protocol
        try:
            first = next(protocol)
        except StopIteration as stop:
            if thread._root is protocol:
                thread.result = stop.value
            thread.done = not thread._frames
            return
        thread._frames.append([protocol, first])

    # -- choosing the order ------------------------------------------------------------------
    def pending(self) -> list[Thread]:
        """Threads with a step left, in the order they were started."""
        return [t for t in self.threads if not t.done]

    def thread(self, name: str) -> Thread:
        for t in self.threads:
            if t.name == name:
                return t
        raise ApicValueError(
            f"thread={name!r} is not queued; pending: {[t.name for t in self.pending()]}"
        )

    def step(self, thread: Thread | str) -> Step:
        """Run the next step of ``thread`` (a Thread or its name); returns the step run."""
        t = self.thread(thread) if isinstance(thread, str) else thread
        frame_step = t.next_step
        if frame_step is None:
            raise ApicValueError(f"thread={t.name!r} has no step left")
        frame = t._frames[-1]
        generator = frame[0]
        assert isinstance(generator, Generator)
        self._running = t
        try:
            value = frame_step.run()
        finally:
            self._running = None
        self.history.append((t.name, frame_step.name))
        t.steps_run.append(frame_step.name)
        try:
            frame[1] = generator.send(value)
        except StopIteration as stop:
            t._frames.remove(frame)
            if generator is t._root:
                t.result = stop.value
            t.done = not t._frames
        return frame_step

    def run_all(self) -> None:
        """Run every pending step, oldest thread first (program order)."""
        while True:
            pending = self.pending()
            if not pending:
                return
            self.step(pending[0])

    def replay(self, order: Sequence[str]) -> None:
        """Run one step of each named thread in turn (a recorded or chosen order)."""
        for name in order:
            self.step(name)

    def clear(self) -> None:
        """Drop every queued thread (their remaining steps never run) and the history."""
        self.threads.clear()
        self.history.clear()

    def __repr__(self) -> str:
        mode = "queued" if self.queued else "eager"
        return f"<Steps {mode} pending={[t.name for t in self.pending()]}>"


def explore(setup: Callable[[], Steps], limit: int = 100_000) -> Iterator[tuple[str, ...]]:
    """Every order of the queued steps ``setup()`` leaves, as thread-name sequences.

    ``setup`` builds a fresh system each time and returns its (queued) scheduler with the
    threads started; each order is found by replaying its prefix on a fresh system, so the
    caller can replay a yielded order the same way and check the outcome."""
    stack: list[tuple[str, ...]] = [()]
    seen = 0
    while stack:
        prefix = stack.pop()
        steps = setup()
        steps.replay(prefix)
        names = [t.name for t in steps.pending()]
        if not names:
            seen += 1
            if seen > limit:
                raise ApicValueError(f"limit={limit} orders exceeded")
            yield prefix
            continue
        for name in reversed(names):
            stack.append((*prefix, name))
