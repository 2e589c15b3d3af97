"""The config: typed structs, decoding and line lookup, checks (cycles), the plan, the JSON
Schema.
"""
