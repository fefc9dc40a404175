"""One description of a run for every front end: the web app, the batch runner and (as it adopts it) the CLI
turn a request (method + arguments) into the same Python call, the same files and the same ``record.json``.

    from attnkit.runs import RunContext, execute, load_model, parse_request, staged_folder, write_output
    request = parse_request({"method": "maps", "prompt": "a red circle on a white background", "seed": 1})
    pipe = load_model(None)                      # the bundled model ("tiny" for a random test pipeline)
    output = execute(pipe, request, RunContext())
    with staged_folder(Path("outputs/maps-1")) as folder:
        write_output(output, folder)             # image.png, maps.png, words/..., record.json

The methods and their fields live in :mod:`attnkit.runs.methods` (one ``register`` entry per method).
"""

from attnkit.runs.execute import (
    RECORD,
    Output,
    RunContext,
    batch_key,
    build_record,
    check,
    execute,
    execute_batch,
    load_model,
    resolve_device,
    staged_folder,
    write_output,
)
from attnkit.runs.spec import (
    Field,
    Method,
    Request,
    cli_line,
    get_method,
    method_names,
    parse_request,
    register,
)

__all__ = [
    "RECORD", "Field", "Method", "Output", "Request", "RunContext", "batch_key", "build_record", "check",
    "cli_line", "execute", "execute_batch", "get_method", "load_model", "method_names", "parse_request",
    "register", "resolve_device", "staged_folder", "write_output",
]
