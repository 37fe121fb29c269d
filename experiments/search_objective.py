"""Issue 12: would another search objective pick other generation settings? Re-reads the search's trials.

For every class it reports the setting (strength, guidance, steps) that each objective ranks first among the trials
the search ran (all scored on the same held-out real images): FID (the pipeline's), KID, FID of the trials that
pass the near-copy rule (the pipeline's choice), and how far apart the best two are in FID noise.

    python experiments/search_objective.py --search reports/neu/k10/search --out reports/neu/k10/search_objective.json
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def setting(trial: dict) -> list:
    return [trial["strength"], trial["guidance_scale"], trial["steps"]]


def objectives(record: dict) -> dict:
    fid, kid = record["metric"], record["metric"].replace("fid", "kid") + "_mean"
    trials = [t for t in record["trials"] if t.get(fid) is not None]
    by_fid = sorted(trials, key=lambda t: t[fid])
    return {
        "trials": len(trials),
        "chosen (FID, near-copy rule)": setting(record["best"]),
        "FID": setting(by_fid[0]),
        "KID": setting(min(trials, key=lambda t: t[kid])),
        "FID best - runner-up": round(by_fid[1][fid] - by_fid[0][fid], 2),
        "FID noise (bootstrap std)": record["noise"][f"median_{fid}_std"],
    }


@click.command()
@click.option("--search", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def main(search: Path, out: Path) -> None:
    records = [json.loads(f.read_text()) for f in sorted(search.glob("*.json"))]
    result = {record["class"]: objectives(record) for record in records}
    result["same choice, KID vs FID"] = sum(r["KID"] == r["FID"] for r in result.values())
    out.write_text(json.dumps(result, indent=1))
    click.echo(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
