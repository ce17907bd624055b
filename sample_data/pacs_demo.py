"""`make pacs-demo`: a hospital PACS in miniature, end to end, on a real Orthanc.

1. Starts Orthanc (its storage in <out>/orthanc) with medxfer's AE title registered.
2. Loads the bundled sample (BreastMNIST as DICOM, placeholder patients with accession numbers)
   and writes the label export a RIS would give for it, keyed by accession number. The last
   `new_studies` test images are held back: they arrive later, dated today.
3. Trains from the PACS (train-pipeline, data.source: pacs).
4. Uploads the new studies and scores them (score-pacs): one Comprehensive SR per image goes
   back into its study over STOW-RS.
5. Reads the SRs back (QIDO-RS, WADO-RS) and parses one with highdicom.

Orthanc is stopped at the end (its storage kept); --keep-running leaves it up for a viewer
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd
import pydicom
import yaml

from configs import CONFIG_DIR, DicomWebConfig, PacsQuery
from flows.pacs_score import PacsScoreSummary, score_pacs
from flows.pipeline import PipelineSummary, train_pipeline
from sample_data.breastmnist import write_breastmnist_dicom
from sample_data.orthanc import LocalOrthanc
from stack.settings import free_port
from sample_data.pacs_sample import label_export
from tasks.dicom_results import dicom_bytes, read_result
from tasks.pacs.dicomweb import DicomWebPacs
from tasks.pacs.retry import RetryPolicy

PACS_AE, PIPELINE_AE = "ORTHANC", "MEDXFER"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR


@dataclass
class DemoResult:
    config: Path
    trained: PipelineSummary
    scored: PacsScoreSummary
    results: list[pydicom.Dataset]  # the SRs read back from Orthanc
    orthanc: LocalOrthanc


def demo_config(out: Path, orthanc: LocalOrthanc, scp_port: int, overrides: dict | None = None) -> Path:
    """configs/breast_ultrasound_pacs.yaml pointed at the demo's Orthanc, outputs under `out`."""
    raw = yaml.safe_load((CONFIG_DIR / "breast_ultrasound_pacs.yaml").read_text())
    raw["output_dir"] = str(out / "outputs")
    raw["data"] |= {"root": str(out / "images"), "manifest": str(out / "images" / "manifest.csv")}
    raw["preprocess"]["cache_dir"] = str(out / "cache")
    raw["registry"]["tracking_uri"] = f"sqlite:///{out / 'mlflow.db'}"
    pacs = raw["pacs"]
    pacs["dicomweb"]["url"] = orthanc.dicomweb_url
    pacs["dimse"] |= {"port": orthanc.dicom_port, "storage_port": scp_port}
    pacs["labels"]["path"] = str(out / "ris_export.csv")
    pacs["store_dir"] = str(out / "store")
    for section, values in (overrides or {}).items():
        raw[section] = raw.get(section, {}) | values if isinstance(values, dict) else values
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _as_new_study(path: Path, today: date) -> bytes:
    ds = pydicom.dcmread(path)
    ds.StudyDate = today.strftime("%Y%m%d")
    return dicom_bytes(ds)


def read_back_results(orthanc: LocalOrthanc) -> list[pydicom.Dataset]:
    """Every Comprehensive SR on the PACS, retrieved as a viewer would (QIDO-RS, then WADO-RS)."""
    pacs = DicomWebPacs(DicomWebConfig(url=orthanc.dicomweb_url), 30, RetryPolicy(3, 1, 5), 4)
    try:
        refs = pacs.find({}, PacsQuery(sop_classes=[SR_STORAGE]))
        return [pydicom.dcmread(io.BytesIO(pacs.fetch(ref))) for ref in refs]
    finally:
        pacs.close()


def run_demo(out: Path, per_split: int | None = None, new_studies: int = 10, overrides: dict | None = None,
             keep_running: bool = False) -> DemoResult:
    out = Path(out)
    scp_port = free_port()
    orthanc = LocalOrthanc(out / "orthanc", aet=PACS_AE, modalities={"medxfer": (PIPELINE_AE, "127.0.0.1", scp_port)})
    orthanc.start()
    try:
        sample = out / "sample"
        if not (sample / "manifest.csv").exists():
            write_breastmnist_dicom(sample, per_split=per_split)
        manifest = pd.read_csv(sample / "manifest.csv")
        later = manifest[manifest["split"] == "test"].tail(new_studies)
        now = manifest.drop(later.index)
        for rel in now["path"]:
            orthanc.upload((sample / rel).read_bytes())
        label_export(sample, out / "ris_export.csv", paths=now["path"])
        print(f"Orthanc at {orthanc.url} (DICOM {PACS_AE}@127.0.0.1:{orthanc.dicom_port}): {len(now)} studies "
              f"and a label export of {len(now)} rows")

        config = demo_config(out, orthanc, scp_port, overrides)
        trained = train_pipeline(str(config))  # the flow logs where its outputs are

        today = date.today()
        for rel in later["path"]:
            orthanc.upload(_as_new_study(sample / rel, today))
        print(f"{len(later)} new studies arrived, dated {today.isoformat()}")
        scored = score_pacs(str(config))
        print(f"scored {scored.counts} with {scored.model}; scores in {scored.scores_csv}")

        results = read_back_results(orthanc)
        if results:  # what the record now says (its identifiers stay in the record, not the console)
            first = read_result(results[0])
            print(f"{len(results)} SRs in Orthanc; the first says {first['measurements']}, {first['evaluations']}, "
                  f"by {first['algorithm'][0]} v{first['algorithm'][1]}")
        if keep_running:
            print(f"Orthanc keeps running at {orthanc.url} (Ctrl-C stops it)")
            while True:
                time.sleep(3600)
        return DemoResult(config, trained, scored, results, orthanc)
    except KeyboardInterrupt:
        raise SystemExit(0)
    finally:
        orthanc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("outputs/pacs-demo"))
    parser.add_argument("--per-split", type=int, help="the first N images of each official split (a quick demo)")
    parser.add_argument("--new-studies", type=int, default=10)
    parser.add_argument("--keep-running", action="store_true", help="leave Orthanc up until Ctrl-C")
    args = parser.parse_args()
    run_demo(args.out, args.per_split, args.new_studies, keep_running=args.keep_running)


if __name__ == "__main__":
    main()
