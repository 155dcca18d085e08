"""GET /bundle: what this server serves, in a bundle manifest's form (app/bundles/model_bundle.py)."""
from fastapi import APIRouter

from app.api.deps import RuntimeDep
from app.bundles.model_bundle import served_manifest

router = APIRouter(tags=["bundle"])


@router.get("/bundle")
def describe_served_bundle(runtime: RuntimeDep) -> dict:
    """The model (id, source, sha256 of its weights as `medzero bundle export` would write them), the description
    corpus files with their hashes, the index and the label sets with versions: compare two sites, or a site
    with a bundle's bundle.json."""
    return served_manifest(runtime)
