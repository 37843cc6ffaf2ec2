"""Check every model repo pushed to the Hugging Face Hub, from a Hub webhook.

Run it (``pip install modelhash uvicorn``)::

    export MODELHASH_REGISTRY=https://registry.example MODELHASH_API_KEY=mh_...
    export WEBHOOK_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')
    uvicorn hub_webhook:app --host 0.0.0.0 --port 9001

Then, on the Hub, add a webhook (your organisation's Settings -> Webhooks) for the
repos to watch, with that secret and the URL of this server. Each create or update
of a model repo queues a check of its new commit in a SQLite file
(``HUB_CHECK_QUEUE``), before the Hub gets its answer: a restart loses nothing, and
a repo that cannot be fetched yet is retried with backoff. Each check downloads the
weights and checks every layer, so derivatives of flagged models are found too.
This example logs the verdicts; replace ``on_report`` with your own action: hide
the repo, open a ticket.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from modelhash import HubReport, RegistryClient, RepoEvent, WebhookReceiver, background_checker

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("hub-webhook")

registry = RegistryClient()  # one connection pool for every check


def on_report(event: RepoEvent, report: Any) -> None:
    """Called from a worker thread once a repo is checked, or once its last retry
    failed (then ``report`` is the exception: look at the repo by hand)."""
    if not isinstance(report, HubReport):
        log.error("%s: not checked after every retry (%s)", event.ref, report)
        return
    matched = [r for r in report.results if r.verdict == "match"]
    if matched:
        for r in matched:
            flags = ", ".join(f"{m.category} flag {m.flag_id}" for m in r.matches)
            log.warning("MATCH %s: %s", r.path, flags)
    else:
        log.info("clean %s@%s", report.repo_id, report.revision)


checker = background_checker(
    registry, on_report, queue=os.environ.get("HUB_CHECK_QUEUE", "hub-check-queue.sqlite3"),
    workers=int(os.environ.get("HUB_CHECK_WORKERS", "1")),
)
app = WebhookReceiver(os.environ["WEBHOOK_SECRET"], checker)
