"""Data from layouts older than migrations, carried along by the baseline revision (alembic/versions/0001).

- The table kpl_fits (before learned method state had one table) moves into method_states as kind "kpl", in the
  layout app.methods.kpl.KPLFit.to_state writes, then the old table is dropped; inside the migration's transaction.
"""
import json
import logging

import numpy as np
from sqlalchemy import MetaData, Table, select
from sqlalchemy.engine import Connection

from app.storage.db import LabelSetRow, MethodStateRow
from app.storage.method_states import pack_arrays

log = logging.getLogger(__name__)


def move_kpl_fits(connection: Connection) -> None:
    legacy = Table("kpl_fits", MetaData(), autoload_with=connection)
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
