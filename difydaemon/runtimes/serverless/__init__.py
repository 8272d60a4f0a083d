"""
The serverless runtime (``PLATFORM=serverless``, ``serverless.md``): plugins
run as functions behind an SRI connector, one HTTP request per session.

- :mod:`.launch_stream`: the connector's launch progress stream (pure);
- :mod:`.response`: the ``/invoke`` response stream of a function (pure);
- :mod:`.batching`: splitting and merging embedding / num-tokens calls (pure);
- :mod:`.connector`: the SRI client (ping, instances, launch);
- :mod:`.invoke`: the pooled ``/invoke`` client (size limit, retries);
- :mod:`.sessions`: the live serverless sessions backwards transactions check;
- :mod:`.runtime`: the IPluginRuntime of one function and the factory the
  runtime registry brings identifiers up with.
"""
