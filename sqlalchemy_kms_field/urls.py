"""Database URLs as users type them: the scheme mistakes that SQLAlchemy answers obscurely.

``postgres://`` (Heroku's and libpq's spelling) and ``mysql://`` (which picks the MySQLdb driver)
are the two most common; both get a message naming the URL to use instead.
"""

from __future__ import annotations

import sqlalchemy as sa

# Scheme as typed -> the SQLAlchemy URL prefix this library installs a driver for.
_SCHEMES = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


def url_hint(url: str) -> str | None:
    """What to write instead, when ``url``'s scheme is one SQLAlchemy (or its drivers) refuse."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        return None
    better = _SCHEMES[scheme]
    if scheme in ("postgresql", "mysql", "mariadb"):
        try:
            sa.make_url(url).get_dialect().import_dbapi()  # the default driver is there
            return None
        except (ImportError, sa.exc.NoSuchModuleError, sa.exc.ArgumentError):
            pass
    extra = "postgresql" if better.startswith("postgresql") else "mysql"
    return (
        f"write {better}://... instead of {scheme}://... (the driver of the [{extra}] extra: "
        f"pip install 'sqlalchemy-kms-field[{extra}]')"
    )
