"""
Our SRI connector, ``twistd -n dify-sri`` (``serverless.md`` §2, §9.1): the
service a daemon on ``PLATFORM=serverless`` launches plugin packages through.

It answers ``ping``, ``instances`` and ``launch``; a launch builds the
package's venv with the same environment builder (and caches) as the local
runtime, runs the package with the SDK in ``INSTALL_METHOD=serverless`` mode
on a port of its own, and announces that function's URL.  Functions that die
are restarted; all stop with the connector.

- :mod:`.wire`: the pure wire formats (launch stream lines, instances
  bodies, the launch form, package file names);
- :mod:`.admission`: what a request's head decides (key, route, body bound);
- :mod:`.functions`: running functions (process, restart, stop) and the
  table of them;
- :mod:`.launcher`: a launch from package bytes to a running function;
- :mod:`.resource`: the HTTP routes;
- :mod:`.tap`: ``twistd dify-sri``'s options and wiring.
"""
