-- A key version added, rotated, retired, marked compromised or re-wrapped
-- tells every node at once (NOTIFY is delivered when the transaction
-- commits). The counters (encryptions, live) are not a key change.
CREATE FUNCTION piivault_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('piivault_keys', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER keys_changed AFTER INSERT OR DELETE OR UPDATE OF state, wrapped ON keys
    FOR EACH STATEMENT EXECUTE FUNCTION piivault_keys_changed();
