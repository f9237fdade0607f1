"""`discflow report --html`: one standalone page (no script, no external files) for a job."""
from __future__ import annotations

from html import escape
from typing import Any

STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #999;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}")


def report_html(summary: dict[str, Any], outcomes: list[Any]) -> str:
    rows = "".join(
        f"<tr><td>{escape(stage)}</td><td>{row['seconds']:.2f}</td><td>{row['task_seconds']:.2f}</td>"
        f"<td>{row['queue_wait_seconds']:.2f}</td><td>{row['tasks']}</td><td>{row['instances']}</td>"
        f"<td>{row['instances_per_second']:.1f}</td><td>{row['mb_per_second']:.1f}</td></tr>"
        for stage, row in summary["stages"].items())
    failed = "".join(f"<tr><td>{o.index}</td><td>{escape(o.sop_instance_uid)}</td><td>{o.dimse_status or ''}</td>"
                     f"<td>{escape(o.reason)}</td></tr>" for o in outcomes if not o.ok)
    title = f"{summary['kind']} {summary['job_id']}: {summary['status']}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f"<p>submitted {escape(str(summary.get('created_at')))} by {escape(summary.get('submitted_by', ''))}, "
            f"{escape(str(summary.get('seconds', '')))} s, instances {escape(str(summary.get('instances')))}</p>"
            "<table><tr><th>stage</th><th>wall s</th><th>task s</th><th>queue wait s</th><th>tasks</th>"
            f"<th>instances</th><th>instances/s</th><th>MB/s</th></tr>{rows}</table>"
            + (f"<h2>Failed instances</h2><table><tr><th>#</th><th>SOP Instance UID</th><th>status</th>"
               f"<th>reason</th></tr>{failed}</table>" if failed else "")
            + "</body></html>")
