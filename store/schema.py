"""The store's SQLite schema, documented beside its CREATE TABLEs (the one place that defines it).

Layout of a store root:

    index.db            this database (WAL mode); also holds contents of up to 4 KiB (objects.data)
    objects/ab/cdef..   one file per larger distinct content, named by its hex XXH3-128 (first two digits: the dir)
    tmp/                staging for imports in progress (import-<id>/), removed on completion or recovery
    lock                flock: importers hold it shared, gc/fsck/recovery exclusive
    derived/<hex>/<kind>/   data derived from one layer by a user of the store (e.g. unionfs's kernel metadata
                        trees), keyed by the hex of the layer's DiffID; the store knows only this contract: a
                        <kind> directory appears whole (renamed into place) holding a file `complete`, written
                        last; gc removes the directories of layers that are gone, fsck reports incomplete ones
    containers/, volumes/   owned by the runtime

Identity rules: a layer is identified by its DiffID (sha256 of its uncompressed tar); an image by its ImageID
(sha256 of its config bytes, kept verbatim). File contents are identified by XXH3-128 but a hash hit is always
confirmed byte for byte before two contents are merged.
"""
from __future__ import annotations

# Migrations from older schema versions, applied in order by store/root.py before SCHEMA's CREATE TABLEs.
# Version 3 adds skeleton_objects (created by SCHEMA), which store/root.py then fills from every layer's skeleton.
# Version 4 adds build_cache (created by SCHEMA; an older store simply starts with an empty cache).
MIGRATIONS = {
    2: ["ALTER TABLE objects ADD COLUMN data BLOB"],
    4: [],
}

SCHEMA_VERSION = 4
# Contents of up to one filesystem block are kept in the index (objects.data), not as files.
INLINE_MAX = 4096

SCHEMA = """
-- One row per distinct content. Contents of up to INLINE_MAX bytes (above) live in `data`: below one
-- filesystem block a file would cost a whole block and an inode. Larger ones are files under objects/, and their
-- rows are written only after the file is durable (staged, synced, moved into objects/), in the same transaction
-- as the entries that use it.
CREATE TABLE IF NOT EXISTS objects (
    hash TEXT PRIMARY KEY,          -- hex XXH3-128 of the content (32 digits)
    size INTEGER NOT NULL,          -- content bytes
    data BLOB                       -- the content itself when inlined, NULL when it is a file under objects/
) WITHOUT ROWID;

-- One row per distinct layer. A layer's bytes are rebuilt exactly from its tarsplit object (every byte of the
-- tar that is not file content: headers, PAX records, padding, the end blocks) interleaved with the objects of
-- its regular files, so an exported layer hashes to the same DiffID it was imported with.
CREATE TABLE IF NOT EXISTS layers (
    id INTEGER PRIMARY KEY,
    diff_id TEXT NOT NULL UNIQUE,   -- "sha256:<hex>" of the uncompressed tar
    size INTEGER NOT NULL,          -- bytes of the uncompressed tar
    content_size INTEGER NOT NULL,  -- bytes of file content (hardlinks once): what `history` shows
    tarsplit TEXT NOT NULL,         -- objects.hash of the tar skeleton (see store/tarsplit.py for its format)
    n_entries INTEGER NOT NULL,
    created TEXT NOT NULL           -- ISO 8601 UTC, when first stored
);

-- One row per path of a layer, including whiteouts. The row id is the entry's inode number as the union
-- filesystem reports it, stable for the life of the layer. Paths are absolute within the layer; the root has
-- parent '' and name ''. Every parent directory of an entry has an entry of its own (implied ones are made
-- explicit at import with mode 0755, owner 0:0, mtime 0, implicit = 1).
CREATE TABLE IF NOT EXISTS entries (
    ino INTEGER PRIMARY KEY,
    layer_id INTEGER NOT NULL,      -- layers.id
    parent TEXT NOT NULL,           -- directory path: '/' for top-level names, '/etc' for /etc/passwd
    name TEXT NOT NULL,             -- the last path component
    kind TEXT NOT NULL,             -- f file, d dir, l symlink, c char, b block, p fifo, w whiteout
    mode INTEGER NOT NULL,          -- full st_mode (type bits | permissions)
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,          -- content bytes of a file, 0 otherwise
    object TEXT,                    -- objects.hash of a file's content
    linkname TEXT,                  -- a symlink's target
    rdev INTEGER NOT NULL DEFAULT 0,-- device number of c/b entries
    link_ino INTEGER,               -- hardlinks: the ino of the group's first entry (which has link_ino NULL)
    nlink INTEGER NOT NULL DEFAULT 1,  -- members of the hardlink group (same on each member)
    xattrs TEXT,                    -- JSON {name: hex value}, NULL when none
    opaque INTEGER NOT NULL DEFAULT 0, -- directory hides lower layers (.wh..wh..opq)
    implicit INTEGER NOT NULL DEFAULT 0 -- directory absent from the tar, implied by its children
);
CREATE UNIQUE INDEX IF NOT EXISTS entries_path ON entries(layer_id, parent, name);
CREATE INDEX IF NOT EXISTS entries_object ON entries(object) WHERE object IS NOT NULL;

-- Objects a layer's tar skeleton interleaves as file content that none of its entries names: the contents of
-- whiteout files (`.wh.x`, `.wh..wh..opq` and aufs's `.wh..wh.*`), which become whiteouts and opaque flags, not
-- entries. The layer cannot be rebuilt without them, so gc keeps them as it keeps entries' objects. Written with
-- the layer's rows at import; schema 3 filled it for older layers by reading their skeletons.
CREATE TABLE IF NOT EXISTS skeleton_objects (
    layer_id INTEGER NOT NULL,      -- layers.id
    object TEXT NOT NULL,           -- objects.hash
    PRIMARY KEY (layer_id, object)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS skeleton_objects_object ON skeleton_objects(object);

-- One row per image. The config is kept byte for byte so that its sha256 stays the image id.
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,            -- "sha256:<hex>" of config
    config BLOB NOT NULL,           -- the OCI/Docker image config JSON, verbatim
    created TEXT NOT NULL           -- ISO 8601 UTC, when first stored
) WITHOUT ROWID;

-- The ordered layers of an image, bottom (position 0) to top; position i matches rootfs.diff_ids[i].
CREATE TABLE IF NOT EXISTS image_layers (
    image_id TEXT NOT NULL,         -- images.id
    position INTEGER NOT NULL,
    layer_id INTEGER NOT NULL,      -- layers.id
    PRIMARY KEY (image_id, position)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS image_layers_layer ON image_layers(layer_id);

-- Names for images: "repository:tag" (docker's normalisation: a name without a tag gets ":latest").
CREATE TABLE IF NOT EXISTS tags (
    name TEXT PRIMARY KEY,
    image_id TEXT NOT NULL          -- images.id
) WITHOUT ROWID;

-- Users of an image other than tags (containers, mounts): gc keeps held images, rmi refuses them.
CREATE TABLE IF NOT EXISTS holds (
    holder TEXT PRIMARY KEY,        -- e.g. "container:<id>"
    image_id TEXT NOT NULL
) WITHOUT ROWID;

-- Imports in progress. A row is committed before any object is staged and deleted when the import ends;
-- a row left behind by a crash is rolled back by recovery (store/root.py) under the exclusive lock.
CREATE TABLE IF NOT EXISTS imports (
    id INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL,
    started TEXT NOT NULL,
    staging TEXT NOT NULL           -- tmp/import-<id>, relative to the root
);

-- `lamina build`'s cache: one row per build step, keyed as BuildKit keys it (runtime/build/builder.py): the
-- parent step's key, the instruction after ARG/ENV substitution and, for COPY/ADD, a checksum of the copied files'
-- contents and modes. The image is the one the step made (intermediate images are untagged: gc drops them with
-- their rows, and `lamina builder prune` drops every row). A row whose image is gone is a miss, never an error.
CREATE TABLE IF NOT EXISTS build_cache (
    key TEXT PRIMARY KEY,           -- hex sha256
    image_id TEXT NOT NULL,         -- images.id
    created TEXT NOT NULL           -- ISO 8601 UTC
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS build_cache_image ON build_cache(image_id);

CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""

# The runtime's networks, applied by runtime/ipam.py as a named step of its own ("network", version in
# meta.network_schema), apart from SCHEMA_VERSION: a store of any schema version gets these tables on its first
# networked container, and the store's own migrations never have to know about them.
NETWORK_SCHEMA_KEY = "network_schema"
NETWORK_SCHEMA_VERSION = 1
NETWORK_SCHEMA = """
-- One row per network: the default "bridge" (made on first use, removed with its last container) and the
-- user-defined ones (`lamina network create`, removed by `network rm`). Each is a Linux bridge on the host.
CREATE TABLE IF NOT EXISTS networks (
    name TEXT PRIMARY KEY,          -- "bridge" or the user's name
    id TEXT NOT NULL UNIQUE,        -- 64 hex digits, as Docker's network ids
    subnet TEXT NOT NULL UNIQUE,    -- e.g. "10.88.0.0/16"; never overlapping a host route or another network
    gateway TEXT NOT NULL,          -- the bridge's own address, the containers' default route
    bridge TEXT NOT NULL UNIQUE,    -- the host interface name
    user_defined INTEGER NOT NULL,  -- 1: name resolution between its containers, removed only by `network rm`
    created TEXT NOT NULL           -- ISO 8601 UTC
) WITHOUT ROWID;

-- One row per address in use: the primary key makes two containers with one address impossible, however many
-- start at once (allocation is one BEGIN IMMEDIATE transaction). Released when the container stops or is removed.
CREATE TABLE IF NOT EXISTS net_addresses (
    network TEXT NOT NULL,          -- networks.name
    address TEXT NOT NULL,          -- e.g. "10.88.0.2"
    container TEXT NOT NULL,        -- the container's id
    name TEXT NOT NULL,             -- the container's name, for /etc/hosts of the network's other containers
    aliases TEXT NOT NULL DEFAULT '[]', -- JSON list of --network-alias names
    PRIMARY KEY (network, address)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS net_addresses_container ON net_addresses(container);

-- Published ports (-p, -P): one row per host port and protocol in use, the source of the DNAT rules. Checked
-- against each other under the same transaction as the address, so two containers never publish one port.
CREATE TABLE IF NOT EXISTS net_ports (
    container TEXT NOT NULL,        -- the container's id
    proto TEXT NOT NULL,            -- "tcp" or "udp"
    host_ip TEXT NOT NULL,          -- "" for every host address, else the one given in -p IP:HOST:CONTAINER
    host_port INTEGER NOT NULL,
    container_port INTEGER NOT NULL,
    address TEXT NOT NULL,          -- the container's address the port leads to
    PRIMARY KEY (proto, host_port, host_ip)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS net_ports_container ON net_ports(container);
"""
