"""HTTP routers, one per resource.

Ids in paths use two URL convertors that never match a ':' so `/{id}` and the custom methods `/{id}:cancel`,
`/{id}:predict` are disjoint routes: a GET of `/v1/jobs/x:cancel` is a 405 whose `Allow` names exactly the
documented methods (POST), not a lookup of a job called 'x:cancel'. What an id may contain beyond that is checked
by the store and the registries, which answer a malformed id with their own typed 422.
"""

from starlette.convertors import Convertor, register_url_convertor


class SegmentConvertor(Convertor):
    """One path segment without ':' (labelset and job ids)."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class ModelPathConvertor(SegmentConvertor):
    """Model ids: run folders joined by '/' (like Starlette's `path`), without ':'."""

    regex = "[^:]+"


register_url_convertor("segment", SegmentConvertor())
register_url_convertor("model_path", ModelPathConvertor())
