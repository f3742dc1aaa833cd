"""Engine commands for the `layerfs` CLI: pull, push, images, rmi, image inspect, tag.

Handlers import the engine lazily so that `layerfs mount` stays fast.
"""

from __future__ import annotations

import json
import sys


def _opts(args):
    from .pull import PullOptions

    return PullOptions(
        platform=getattr(args, "platform", "linux/amd64"),
        creds=args.creds,
        authfile=args.authfile,
        tls_verify=args.tls_verify,
    )


def _images(store):
    from .images import ImageStore

    return ImageStore(store)


def cmd_pull(store, args, out) -> int:
    from .progress import reporter
    from .pull import pull

    with reporter(out.as_json) as emit:
        image = pull(_images(store), args.source, args.name, _opts(args), emit)
    if not out.as_json:
        print(image.name)
    return 0


def cmd_push(store, args, out) -> int:
    from .progress import reporter
    from .push import push

    with reporter(out.as_json) as emit:
        digest = push(_images(store), args.image, args.dest, compression=args.compress, opts=_opts(args), chunked=args.chunked, progress=emit)
    if not out.as_json:
        print(digest)
    return 0


def cmd_images(store, args, out) -> int:
    images = _images(store).images()
    if out.as_json:
        out.data([
            {"name": i.name, "id": i.id, "manifest": i.manifest_digest, "top_chain": i.top_chain, "layers": len(i.chain)}
            for i in images
        ])
        return 0
    rows = []
    for i in images:
        size = sum(store.layer(c).size for c in i.chain)
        rows.append([i.name, i.id.split(":", 1)[1][:12], str(len(i.chain)), _human(size)])
    out.table(["IMAGE", "ID", "LAYERS", "SIZE"], rows)
    return 0


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


def cmd_rmi(store, args, out) -> int:
    images = _images(store)
    for name in args.images:
        print(images.remove(name).name)
    return 0


def cmd_inspect(store, args, out) -> int:
    image = _images(store).image(args.image)
    doc = json.loads(image.config_raw)
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    return 0


def cmd_tag(store, args, out) -> int:
    print(_images(store).tag(args.source, args.target).name)
    return 0


def _registry_flags(parser) -> None:
    parser.add_argument("--creds", default=None, metavar="USER:PASS", help="registry credentials")
    parser.add_argument("--authfile", default=None, help="docker-style auth.json")
    parser.add_argument(
        "--tls-verify", default=True, type=lambda v: v.lower() not in ("false", "0", "no"), metavar="BOOL",
        help="require HTTPS with a valid certificate (default true; plain HTTP is used for localhost)",
    )


def add_commands(sub) -> None:
    pull = sub.add_parser("pull", help="pull an image: oci:DIR[:REF], oci-archive:FILE, docker-archive:FILE, docker://HOST/NAME:TAG")
    pull.add_argument("source")
    pull.add_argument("name", nargs="?", default=None, help="local image name (default: from the source)")
    pull.add_argument("--platform", default="linux/amd64")
    _registry_flags(pull)
    pull.set_defaults(func=cmd_pull)

    push = sub.add_parser("push", help="push an image to any transport")
    push.add_argument("image")
    push.add_argument("dest")
    push.add_argument("--compress", default="gzip", choices=("gzip", "zstd", "none"))
    push.add_argument("--chunked", action="store_true", help="chunked blob upload to registries")
    _registry_flags(push)
    push.set_defaults(func=cmd_push)

    sub.add_parser("images", help="list images").set_defaults(func=cmd_images)
    rmi = sub.add_parser("rmi", help="remove images (their layers are released)")
    rmi.add_argument("images", nargs="+", metavar="IMAGE")
    rmi.set_defaults(func=cmd_rmi)
    image = sub.add_parser("image", help="image commands")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    inspect = isub.add_parser("inspect", help="print an image's config JSON")
    inspect.add_argument("image")
    inspect.set_defaults(func=cmd_inspect)
    tag = sub.add_parser("tag", help="give an image another name")
    tag.add_argument("source")
    tag.add_argument("target")
    tag.set_defaults(func=cmd_tag)
