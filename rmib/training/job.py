"""THE orchestration of a training run, shared by every method's `train`.

A method builds its data and its models; `TrainingJob` does the rest, the
same way for all of them, so that every method stops, resumes and reports alike:

- `load_examples`: photographs through the preprocessed cache; files that
  cannot be read are skipped with `on_bad="skip"` and listed in `problems`.
- `start_epoch(phase)`: the epoch a (resumed) phase starts from, read from
  its last checkpoint, so that seeded data pipelines continue where they were.
- `validation(...)`: the whole-image validation callback
  (`rmib.evaluation.WholeImageValidation`).
- `fit(...)`: one phase through `rmib.training.fit`. `time_limit` is for the
  whole run: the training seconds of the earlier phases count against it, and
  when it stops a phase before the last one the run ends there (`stopped`):
  that phase's model becomes `model.keras`. A resume with the same limit ends
  the same way; one with a longer limit continues the stopped phase and the
  phases after it.
- `finish(...)`: the final model, the final validation (reusing the
  callback's metrics of the same epoch when it has them) and `skipped.csv`.

A run that a callback stopped before its end (neither finished, early
stopped nor time-limited) reports nothing: `finish` returns {} and `fit` has
said how to resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from rmib.config import TrainConfig
from rmib.console import training_verbosity
from rmib.data.pipeline import PreprocessedCache, load_examples
from rmib.evaluation import WholeImageValidation, final_validation
from rmib.io import write_skipped
from rmib.training.devices import get_strategy, global_batch_size, is_chief
from rmib.training.run_dir import RunDirectory, checkpoint_state, worker_run_directory
from rmib.training.runner import _say, fit, run_finished


class TrainingJob:
    """One training run of a method, in one run directory, in one or more phases.

    Args:
        run: the run directory (a path or a `RunDirectory`).
        config: the run's `TrainConfig` (its strategy and time limit are the run's).
        resume: continue an interrupted run.
        phases: the names of the run's phases in order (`fit`'s `phase`);
            (None,) for a method trained in one go.
        stop_notes: {phase: what the run holds when the time limit ends it
            in that phase}, for a method whose phases keep their own files
            (the grader); default "its model is the run's model".
        verbose: 0 silent, 1 Keras' progress bars, 2 a line per epoch; None:
            `rmib.console.training_verbosity` (bars on a terminal, else lines).

    Attributes:
        run: the run directory; `own_run` is where this process writes (the
            run itself, or `workers/<task>_<index>/` on a multi-worker run's
            other workers).
        chief: whether this process writes the run directory itself.
        problems: (path, reason) of every file skipped (`skipped.csv`).
        stopped: the time limit ended the run before its last phase.
        trained: some epoch was trained in this invocation.
        interrupted: a phase stopped before its end for another reason (a
            callback): nothing is final; `--resume` continues it.
        model: the model of the latest phase.
    """

    def __init__(
        self,
        run,
        config: TrainConfig,
        *,
        resume: bool = False,
        phases: Sequence = (None,),
        stop_notes: Mapping | None = None,
        verbose=None,
    ):
        self.run = run if isinstance(run, RunDirectory) else RunDirectory(run)
        self.config = config
        self.resume = resume
        self.phases = tuple(phases)
        self.stop_notes = dict(stop_notes or {})
        self.verbose = training_verbosity(verbose)
        self.strategy = get_strategy(config.strategy)
        self.chief = is_chief(self.strategy)
        self.own_run = worker_run_directory(self.run, self.strategy)
        self.problems: list = []
        self.stopped = False
        self.interrupted = False
        self.trained = False
        self.model = None
        self.final_model = None
        self.phase = None
        self.validation_callback = None

    @property
    def batch_size(self) -> int:
        """The global batch size (`--batch-size` is per replica)."""
        return global_batch_size(self.config, self.strategy)

    @property
    def running(self) -> bool:
        """False once the run ended before its last phase (time limit, or interrupted)."""
        return not (self.stopped or self.interrupted)

    def load_examples(self, records, preprocessing, lesion, cache_dir, on_bad) -> list:
        """The preprocessed `Example`s of `records` (unreadable files go to `problems`)."""
        cache = PreprocessedCache(cache_dir or None)
        examples, _ = load_examples(records, preprocessing, lesion, cache, on_bad, self.problems)
        return examples

    def start_epoch(self, phase=None) -> int:
        """The number of epochs `phase` has done: where a resumed phase starts, else 0."""
        if not self.resume:
            return 0
        return int(checkpoint_state(self.own_run, phase).get("epoch", 0))

    def validation(self, examples, make_segmenter, every=1, epochs=None):
        """The whole-image validation callback over `examples`; None without examples."""
        if not examples:
            return None
        return WholeImageValidation(examples, make_segmenter, every=every, epochs=epochs)

    def seconds_before(self, phase) -> float:
        """Training seconds of the phases before `phase` (from their checkpoints)."""
        earlier = self.phases[: self.phases.index(phase)]
        return sum(
            float(checkpoint_state(self.own_run, p).get("train_seconds") or 0.0) for p in earlier
        )

    def fit(
        self,
        make_model,
        train_data,
        val_data=None,
        *,
        config: TrainConfig,
        metadata: dict,
        phase=None,
        validation=None,
        final_model: Callable | None = None,
        **fit_arguments,
    ):
        """Train `phase` with `rmib.training.fit`; returns its model.

        Args:
            make_model, train_data, val_data, config, metadata: as `rmib.training.fit`.
            phase: one of `phases`.
            validation: the whole-image validation callback (`validation`), or None.
            final_model: model -> the network `model.keras` holds, when it is
                not the trained model itself (`finish` then saves it).
            **fit_arguments: the other arguments of `rmib.training.fit`
                (loss, metrics, steps_per_epoch, extra_callbacks ...); `save_final`
                defaults to the end of the last phase when there is no `final_model`.
        """
        last = phase == self.phases[-1]
        save_final = fit_arguments.pop("save_final", last and final_model is None)
        spent = self.seconds_before(phase)
        before = checkpoint_state(self.own_run, phase)
        if (
            config.time_limit
            and spent >= 60.0 * config.time_limit
            and not before
            and self.model is not None
        ):
            self._say(f"the time limit of {config.time_limit:g} min is spent; phase {phase} waits")
            self.stopped = True
            return self.model
        model, _ = fit(
            make_model,
            train_data,
            val_data,
            config=config,
            run_dir=self.run,
            metadata=metadata,
            phase=phase,
            resume=self.resume,
            validation_callbacks=[validation] if validation is not None else [],
            save_final=save_final,
            time_spent=spent,
            verbose=self.verbose,
            **fit_arguments,
        )
        self.model, self.phase, self.validation_callback = model, phase, validation
        self.final_model = final_model
        state = checkpoint_state(self.own_run, phase)
        self.trained |= state.get("epoch") != before.get("epoch")
        if not run_finished(state, config):
            self.interrupted = True
        elif not last and _time_limited(state, config):
            # The next epoch would not fit, even if this phase happens to be complete.
            self._stop_in(phase, config)
        return model

    def loaded(self, phase, model) -> None:
        """Take `model` as the finished `phase`'s without fitting it again.

        For a method that loads its finished phases itself (the grader, which
        then skips building their data): the run stops there, as `fit` would
        stop it, when the time limit ended that phase before the last one.
        """
        self.model, self.phase = model, phase
        state = checkpoint_state(self.own_run, phase)
        if phase != self.phases[-1] and _time_limited(state, self.config):
            self._stop_in(phase, self.config)

    def _stop_in(self, phase, config: TrainConfig) -> None:
        self.stopped = True
        epochs = int(checkpoint_state(self.own_run, phase).get("epoch", 0))
        note = self.stop_notes.get(phase, "its model is the run's model")
        self._say(
            f"the time limit of {config.time_limit:g} min ended the run in phase {phase} "
            f"after {epochs} epoch{'s' * (epochs != 1)}; {note} "
            "(continue with --resume and a longer --time-limit)"
        )

    def finish(self, validate: Callable | None = None, *, reuse_validation: bool = True) -> dict:
        """End the run: the final model, the final validation, `skipped.csv`.

        `model.keras` is saved by `rmib.training.fit` at the end of the last
        phase; here when the time limit ended the run in an earlier phase, or
        as `final_model(model)` when `fit` was given one (again only when this
        invocation trained, or the file is missing).

        Args:
            validate: model.keras's network -> validation metrics; None: no validation.
            reuse_validation: return the validation callback's metrics when it
                computed them for the final weights (`rmib.evaluation.final_validation`)
                instead of calling `validate`.

        Returns:
            The validation metrics; {} without `validate`, or when the run was interrupted.
        """
        self._write_skipped()
        if self.interrupted or self.model is None:
            return {}
        final_model = self.final_model
        network = final_model(self.model) if final_model is not None else self.model
        path = self.own_run.model_path
        if (final_model is not None or self.stopped) and (self.trained or not path.is_file()):
            self.own_run.save_model(network, path, self.own_run.read_metadata())
        if validate is None:
            return {}
        if not reuse_validation:
            return validate(network)
        return final_validation(
            self.own_run, self.phase, self.validation_callback, lambda: validate(network)
        )

    def _write_skipped(self) -> None:
        if self.problems and self.chief:
            write_skipped(self.run.path, self.problems)

    def _say(self, message: str) -> None:
        _say(message, self.verbose)


def _time_limited(state: dict, config: TrainConfig) -> bool:
    """Whether the time limit stopped the phase of `state` under the current limit
    (a resume with a longer `time_limit` goes on, as `rmib.training.run_finished`)."""
    limit = state.get("time_limit") if state.get("time_limited") else None
    return bool(limit) and 0 < config.time_limit <= float(limit)
