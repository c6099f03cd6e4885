import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfdm_sciml._checks import check_finite


def test_check_finite_on_a_constant_inside_a_trace():
    # A concrete array closed over by a traced function is checked on the host, not
    # turned into a traced boolean.
    data = jnp.ones((4, 2))

    def body(carry, _):
        return carry + jnp.sum(check_finite(data, "data")), None

    total, _ = jax.lax.scan(body, jnp.zeros(()), None, length=3)
    np.testing.assert_allclose(total, 24.0)
    bad = data.at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="1 non-finite"):
        jax.lax.scan(
            lambda c, _: (c + jnp.sum(check_finite(bad, "x")), None),
            0.0,
            None,
            length=2,
        )
