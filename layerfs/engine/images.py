"""Images recorded in a store: name -> manifest, config and the layer chain.

Images live in the store's own metadata database (table ``images``) and
hold one reference on each of their layers (taken when the layers were
registered), so the graph keeps what an image uses.  Removing an image
releases them; a layer shared with another image survives.  The engine
also keeps the original layer blobs it pulled or built in a content store
(``<root>/engine/blobs``), so pushing reproduces them byte for byte.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .. import digest as digests
from ..errors import AlreadyExists, InvalidOption, NotFound
from ..graph import LayerStore
from .content import ContentStore
from .oci import ImageConfig, Manifest, parse_config, parse_manifest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    name            TEXT PRIMARY KEY,
    manifest_digest TEXT NOT NULL,
    manifest_type   TEXT NOT NULL,
    manifest        BLOB NOT NULL,
    config_digest   TEXT NOT NULL,
    config          BLOB NOT NULL,
    top_chain       TEXT REFERENCES layers(chain_id),
    chain           TEXT NOT NULL,
    created         REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Image:
    name: str
    manifest_digest: str
    manifest_type: str
    manifest_raw: bytes
    config_digest: str
    config_raw: bytes
    top_chain: str | None  # None for an image without layers
    chain: tuple[str, ...]  # chain ids, base first
    created: float

    @property
    def manifest(self) -> Manifest:
        parsed = parse_manifest(self.manifest_raw, self.manifest_type)
        assert isinstance(parsed, Manifest)
        return parsed

    @property
    def config(self) -> ImageConfig:
        return parse_config(self.config_raw, self.config_digest)

    @property
    def id(self) -> str:
        """Docker's image id: the config digest."""
        return self.config_digest


def normalize_name(name: str) -> str:
    """Local image names carry a tag: "app" -> "app:latest"."""
    if not name or any(c.isspace() for c in name) or name.startswith(("-", "/")):
        raise InvalidOption(f"image name {name!r} is invalid; use NAME[:TAG], e.g. app:1")
    last = name.rsplit("/", 1)[-1]
    if "@" in name or ":" in last:
        return name
    return name + ":latest"


class ImageStore:
    """The images of one LayerStore."""

    def __init__(self, store: LayerStore):
        self.store = store
        with store.db.write() as db:
            db.execute(_SCHEMA)
        self.content = ContentStore(store.root / "engine" / "blobs")

    @staticmethod
    def _image(row) -> Image:
        return Image(
            row["name"], row["manifest_digest"], row["manifest_type"], bytes(row["manifest"]), row["config_digest"],
            bytes(row["config"]), row["top_chain"], tuple(json.loads(row["chain"])), row["created"],
        )

    def images(self) -> list[Image]:
        return [self._image(r) for r in self.store.db.query("SELECT * FROM images ORDER BY created, name")]

    def image(self, name: str) -> Image:
        row = self.store.db.one("SELECT * FROM images WHERE name = ?", (normalize_name(name),))
        if row is None:
            row = self._by_id(name)
        if row is None:
            raise NotFound(f"image {name!r} does not exist; see `layerfs images`")
        return self._image(row)

    def _by_id(self, ref: str):
        hexpart = ref.split(":", 1)[-1]
        if len(hexpart) < 4 or any(c not in "0123456789abcdef" for c in hexpart):
            return None
        rows = self.store.db.query("SELECT * FROM images WHERE config_digest LIKE ?", (f"sha256:{hexpart}%",))
        return rows[0] if len({r["config_digest"] for r in rows}) == 1 else None

    def add(self, name: str, manifest_raw: bytes, manifest_type: str, config_raw: bytes, chain: list[str]) -> Image:
        """Record an image whose layers (chain ids) already hold one reference for it.

        An existing image of the same name is replaced and its references released.
        """
        name = normalize_name(name)
        manifest_digest = digests.sha256_digest(manifest_raw)
        config_digest = digests.sha256_digest(config_raw)
        with self.store.db.write() as db:
            old = db.execute("SELECT * FROM images WHERE name = ?", (name,)).fetchone()
            db.execute("DELETE FROM images WHERE name = ?", (name,))
            db.execute(
                "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, manifest_digest, manifest_type, manifest_raw, config_digest, config_raw,
                 chain[-1] if chain else None, json.dumps(chain), time.time()),
            )
        if old is not None:
            self._release_chain(json.loads(old["chain"]))
        return self.image(name)

    def tag(self, source: str, target: str) -> Image:
        image = self.image(source)
        taken: list[str] = []
        try:
            for chain_id in image.chain:
                self.store.retain(chain_id)
                taken.append(chain_id)
            return self.add(target, image.manifest_raw, image.manifest_type, image.config_raw, list(image.chain))
        except BaseException:
            self._release_chain(taken)
            raise

    def remove(self, name: str) -> Image:
        """Forget an image and release its layers (a layer still used elsewhere stays)."""
        image = self.image(name)
        with self.store.db.write() as db:
            if not db.execute("DELETE FROM images WHERE name = ?", (image.name,)).rowcount:
                raise NotFound(f"image {name!r} does not exist; see `layerfs images`")
        self._release_chain(list(image.chain))
        return image

    def _release_chain(self, chain: list[str]) -> None:
        # Top first: a parent can only lose its last reference once its child is gone.
        for chain_id in reversed(chain):
            self.store.release(chain_id)

    def referenced_blobs(self) -> set[str]:
        """Digests of every blob an image's manifest names (for content gc)."""
        keep: set[str] = set()
        for image in self.images():
            manifest = image.manifest
            keep.add(manifest.config.digest)
            keep.update(d.digest for d in manifest.layers)
        return keep

    def gc(self) -> dict:
        removed = self.content.prune(self.referenced_blobs())
        result = self.store.gc()
        result["blobs_removed"] = removed
        return result


def ensure_unique(store: ImageStore, name: str) -> None:
    if store.store.db.one("SELECT 1 FROM images WHERE name = ?", (normalize_name(name),)):
        raise AlreadyExists(f"image {name!r} already exists; remove it first (layerfs rmi {name})")
