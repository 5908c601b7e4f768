"""A Python client generated from twin's OpenAPI document, used the way a Python user would.

Run by deploy/api-check.sh against a fresh `--no-executor` server, with the package that
openapi-python-client generated (`twin_api`) on PYTHONPATH:

    python client_roundtrip.py http://127.0.0.1:PORT

It creates an experiment, submits an ingest job (with no executor it stays queued) and reads it
back, then plays an executor through the generated calls: one job leased, started, reported,
given an artefact and completed; one failed; one cancelled. Last it pages through `/v1/events`
two at a time and checks that every event came back, in order, as its own typed model. The log
it leaves behind is also what the fuzzing that follows validates response schemas against.
Any mismatch raises, so the process exits non-zero.
"""

import hashlib
import io
import json
import sys

from twin_api import Client
from twin_api.api.blobs import blobs_upload
from twin_api.api.events import events_page
from twin_api.api.executors import (
    executors_complete,
    executors_fail,
    executors_lease,
    executors_progress,
    executors_record_artefact,
    executors_start,
)
from twin_api.api.experiments import experiments_create
from twin_api.api.jobs import jobs_cancel, jobs_get, jobs_list, jobs_submit
from twin_api.models import (
    ArtefactBody,
    BlobStored,
    Capabilities,
    CompleteBody,
    CreateExperiment,
    EpochBody,
    ErrorBody,
    EventsPage,
    Experiment,
    FailBody,
    FailureCode,
    IngestJobOutput,
    IngestJobOutputKind,
    IngestJobResult,
    IngestJobSpec,
    IngestJobSpecKind,
    IngestSourceType0,
    JobKind,
    JobState,
    JobStatus,
    JobSubmission,
    LeaseGrant,
    LeaseRequest,
    ProgressBody,
)
from twin_api.types import File

EXPERIMENT = "api-check"


def expect(response, status, model):
    """The parsed body of `response`, which must have `status` and parse as `model`."""
    if response.status_code != status or not isinstance(response.parsed, model):
        raise AssertionError(
            f"expected {status} {model.__name__}, got {response.status_code}: "
            f"{response.content[:500]!r}"
        )
    return response.parsed


def ingest(dataset, priority=0):
    return JobSubmission(
        spec=IngestJobSpec(
            kind=IngestJobSpecKind.INGEST,
            dataset=dataset,
            source=IngestSourceType0(dir_=f"/data/{dataset}"),
        ),
        experiment=EXPERIMENT,
        priority=priority,
    )


def submit(client, submission, status=201, key=None):
    kwargs = {} if key is None else {"idempotency_key": key}
    return expect(
        jobs_submit.sync_detailed(client=client, body=submission, **kwargs), status, JobState
    )


def job(client, job_id):
    return expect(jobs_get.sync_detailed(job_id, client=client), 200, JobState)


def lease(client):
    grant = executors_lease.sync_detailed(
        client=client,
        body=LeaseRequest(
            executor="api-check",
            capabilities=Capabilities(kinds=[JobKind.INGEST]),
            wait_ms=0,
        ),
    )
    return expect(grant, 200, LeaseGrant)


def submit_and_read_back(client):
    expect(
        experiments_create.sync_detailed(client=client, body=CreateExperiment(name=EXPERIMENT)),
        201,
        Experiment,
    )
    queued = submit(client, ingest("birds"), key="api-check-1")
    # A retry with the same key is the same job.
    replayed = submit(client, ingest("birds"), status=200, key="api-check-1")
    assert replayed.id == queued.id, (replayed.id, queued.id)

    back = job(client, queued.id)
    assert back.status == JobStatus.QUEUED, back.status
    assert back.kind == JobKind.INGEST, back.kind
    assert back.experiment == EXPERIMENT, back.experiment
    spec = back.submission.spec
    assert isinstance(spec, IngestJobSpec), type(spec)
    assert (spec.kind, spec.dataset, spec.source.dir_) == (
        IngestJobSpecKind.INGEST,
        "birds",
        "/data/birds",
    ), spec

    listed = jobs_list.sync_detailed(client=client, experiment=EXPERIMENT, state="queued")
    assert [j.id for j in expect(listed, 200, list)] == [queued.id], listed.parsed

    # Errors come back as the shared error body.
    bad = expect(jobs_get.sync_detailed("Not-An-Id", client=client), 400, ErrorBody)
    assert bad.error.code == "invalid_id", bad.error
    return queued.id


def run_one_to_completion(client):
    """One job through the executor protocol; returns its id."""
    job_id = submit(client, ingest("cars", priority=10)).id
    grant = lease(client)
    assert grant.job.id == job_id, (grant.job.id, job_id)
    epoch = grant.epoch
    expect(
        executors_start.sync_detailed(job_id, client=client, body=EpochBody(epoch=epoch)),
        200,
        JobState,
    )
    expect(
        executors_progress.sync_detailed(
            job_id,
            client=client,
            body=ProgressBody(epoch=epoch, message="halfway", fraction=0.5),
        ),
        200,
        JobState,
    )
    manifest = b'{"path": "a.jpg", "instance": "a", "category": "c"}\n'
    digest = hashlib.sha256(manifest).hexdigest()
    stored = expect(
        blobs_upload.sync_detailed(digest, client=client, body=File(payload=io.BytesIO(manifest))),
        201,
        BlobStored,
    )
    assert (stored.hash_, stored.bytes_) == (digest, len(manifest)), stored
    expect(
        executors_record_artefact.sync_detailed(
            job_id, client=client, body=ArtefactBody(epoch=epoch, name="manifest", blob=digest)
        ),
        200,
        JobState,
    )
    done = expect(
        executors_complete.sync_detailed(
            job_id,
            client=client,
            body=CompleteBody(
                epoch=epoch,
                output=IngestJobOutput(
                    kind=IngestJobOutputKind.INGEST,
                    manifest=digest,
                    images=1,
                    instances=1,
                    categories=1,
                    rejected=[],
                    rejected_total=0,
                ),
            ),
        ),
        200,
        JobState,
    )
    assert done.status == JobStatus.SUCCEEDED, done.status
    assert isinstance(done.result, IngestJobResult), type(done.result)
    assert done.result.manifest == digest and done.result.dataset, done.result
    return job_id


def fail_one(client):
    job_id = submit(client, ingest("boats", priority=10)).id
    epoch = lease(client).epoch
    failed = expect(
        executors_fail.sync_detailed(
            job_id,
            client=client,
            body=FailBody(epoch=epoch, error="no such directory", code=FailureCode.BAD_INPUT),
        ),
        200,
        JobState,
    )
    assert failed.status == JobStatus.FAILED, failed.status


def cancel_one(client):
    job_id = submit(client, ingest("trains")).id
    cancelled = expect(jobs_cancel.sync_detailed(job_id, client=client, body=None), 200, JobState)
    assert cancelled.status == JobStatus.CANCELLED, cancelled.status


def page_through_events(client):
    """Every event, two per page, following `next`."""
    events, cursor = [], 1
    while True:
        page = expect(
            events_page.sync_detailed(client=client, from_=cursor, limit=2), 200, EventsPage
        )
        if not page.events:
            assert page.next_ > page.last_seq, (page.next_, page.last_seq)
            return events, page.last_seq
        assert len(page.events) <= 2, len(page.events)
        events.extend(page.events)
        cursor = page.next_


def first_streamed_event(client):
    """The first frame of the Server-Sent Events stream from the start of the log."""
    with client.get_httpx_client().stream(
        "GET", "/v1/events/stream", params={"from": 1}, timeout=10
    ) as response:
        assert response.status_code == 200, response.status_code
        content_type = response.headers["content-type"]
        assert content_type.startswith("text/event-stream"), content_type
        fields = {}
        for line in response.iter_lines():
            if not line:
                return fields
            name, _, value = line.partition(": ")
            fields[name] = value
    raise AssertionError("the stream ended before its first event")


def main(base_url):
    client = Client(base_url=base_url, raise_on_unexpected_status=True)
    queued = submit_and_read_back(client)
    succeeded = run_one_to_completion(client)
    fail_one(client)
    cancel_one(client)
    # The first job was never leased: the later ones had the higher priority or were cancelled.
    assert job(client, queued).status == JobStatus.QUEUED

    events, last_seq = page_through_events(client)
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, last_seq + 1)), seqs
    for e in events:
        # Each event parsed as the model its `type` names (`job_submitted` -> RecordedJobSubmitted).
        expected = "Recorded" + "".join(w.capitalize() for w in e.type_.value.split("_"))
        assert type(e).__name__ == expected, (type(e).__name__, e.type_)
    types = {e.type_.value for e in events}
    wanted = {
        "experiment_created",
        "job_submitted",
        "job_leased",
        "job_started",
        "job_progress",
        "job_artefact_recorded",
        "job_succeeded",
        "job_attempt_failed",
        "job_cancelled",
    }
    assert wanted <= types, wanted - types

    # A prefix pages through one stream.
    page = expect(
        events_page.sync_detailed(client=client, prefix=f"job/{succeeded}", limit=100),
        200,
        EventsPage,
    )
    assert page.events and all(e.stream == f"job/{succeeded}" for e in page.events), page.events
    # The stream names events as the pages do.
    frame = first_streamed_event(client)
    assert (frame["id"], frame["event"]) == ("1", "experiment_created"), frame
    assert json.loads(frame["data"])["type"] == "experiment_created", frame

    print(json.dumps({"events": len(events), "types": sorted(types), "last_seq": last_seq}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: client_roundtrip.py BASE_URL")
    main(sys.argv[1])
