"""transcode: convert a batch of instances to the job's transfer syntax, one outcome per instance."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tasks import transfer_syntax
from tasks.manifest import Instance
from tasks.spool import JobSpool, read_json, write_json
from workers import progress
from workers.app import app
from workers.settings import get_settings
from workers.timing import stage_timer


@dataclass
class Outcome:
    """What became of one instance in a stage; ``path`` is the file the next stage uses."""
    index: int
    ok: bool
    path: str = ""
    transfer_syntax: str = ""
    sop_instance_uid: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    reason: str = ""


def transcode_instance(spool: JobSpool, instance: Instance) -> Outcome:
    destination = spool.transcoded_path(instance.index)
    source = Path(instance.source)
    try:
        if instance.action == "rewrite" and not instance.target_syntax:
            result = transfer_syntax.rewrite_part10(source, destination)
        else:
            result = transfer_syntax.convert_file(source, destination, str(instance.target_syntax))
    except transfer_syntax.ConversionError as error:
        return Outcome(instance.index, False, reason=str(error), bytes_in=instance.size)
    except Exception as error:  # noqa: BLE001 — one bad instance must not fail its batch
        return Outcome(instance.index, False, reason=f"{type(error).__name__}: {error}", bytes_in=instance.size)
    return Outcome(instance.index, True, str(destination), result.transfer_syntax, result.sop_instance_uid,
                   result.bytes_in, result.bytes_out)


def transcode_batch(spool: JobSpool, number: int) -> list[Outcome]:
    """Convert one batch; a finished batch (its outcome file exists) is not redone."""
    outcome_path = spool.outcome_path("transcode", number)
    if outcome_path.exists():
        return [Outcome(**o) for o in read_json(outcome_path)]
    instances = [Instance(**i) for i in read_json(spool.batch_path("transcode", number))]
    outcomes = [transcode_instance(spool, instance) for instance in instances]
    write_json(outcome_path, [asdict(o) for o in outcomes])
    return outcomes


@app.task(bind=True, name="discflow.transcode.batch")
def transcode_batch_task(self, job_id: str, number: int) -> dict[str, int]:
    settings = get_settings()
    spool = JobSpool(settings.spool_dir, job_id)
    with stage_timer(self, job_id, "transcode") as timing:
        outcomes = transcode_batch(spool, number)
        timing.count(len(outcomes), sum(o.bytes_in for o in outcomes), sum(o.bytes_out for o in outcomes))
    progress.advance(self.app.conf.broker_url, job_id, "transcode", len(outcomes))
    return {"batch": number, "ok": sum(o.ok for o in outcomes), "failed": sum(not o.ok for o in outcomes)}
