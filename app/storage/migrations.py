"""Schema changes that carry existing data along, run by create_db_engine after create_all.

- The table kpl_fits (before learned method state had one table) moves into method_states as kind "kpl",
  in the layout app.methods.kpl.KPLFit.to_state writes, then the old table is dropped; one transaction.
"""
import json
import logging

import numpy as np
from sqlalchemy import MetaData, Table, inspect, select
from sqlalchemy.engine import Engine

from app.storage.db import WRITE_OPTION, LabelSetRow, MethodStateRow
from app.storage.method_states import pack_arrays

log = logging.getLogger(__name__)


def migrate(engine: Engine) -> None:
    if "kpl_fits" in inspect(engine).get_table_names():
        _move_kpl_fits(engine)


def _move_kpl_fits(engine: Engine) -> None:
    legacy = Table("kpl_fits", MetaData(), autoload_with=engine)
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
        names = dict(connection.execute(select(LabelSetRow.id, LabelSetRow.name)).all())
        rows = connection.execute(select(legacy)).mappings().all()
        for row in rows:
            config = _json(row["config"])
            sizes = config.pop("_evidence_sizes")
            shape = (row["n_classes"], row["dim"])
            arrays = {"text_proxies": np.frombuffer(row["text_proxies"], np.float32).reshape(shape),
                      "vision_proxies": np.frombuffer(row["vision_proxies"], np.float32).reshape(shape),
                      "evidence_vectors": np.frombuffer(row["evidence_vectors"], np.float32).reshape(-1, row["dim"])}
            class_balance = _json(row["class_balance"])
            meta = {"label_set": names.get(row["label_set_id"]), "label_set_version": row["label_set_version"],
                    "model_id": row["model_id"], "class_names": list(class_balance),
                    "evidence": _json(row["evidence"]), "evidence_sizes": sizes, "pool_size": row["pool_size"],
                    "class_balance": class_balance, "config": config, "fit_seconds": row["fit_seconds"]}
            connection.execute(MethodStateRow.__table__.insert().values(
                kind="kpl", label_set_id=row["label_set_id"], label_set_version=row["label_set_version"],
                model_id=row["model_id"], version=row["fit_version"], arrays=pack_arrays(arrays), meta=meta,
                created_at=row["created_at"]))
        legacy.drop(connection)
    log.info("moved %d KPL fits from kpl_fits into method_states", len(rows))


def _json(value: object) -> object:
    return json.loads(value) if isinstance(value, str) else value
