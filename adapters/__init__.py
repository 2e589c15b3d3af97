"""Busway's built-in adapters, registered by type name under the `busway.adapters` entry points.

The engine never imports this package: it finds each adapter by the `type` of a source or
sink in the config. Import an adapter's module directly to embed it in an application:
`from busway.adapters.http import HttpSource`.
"""
