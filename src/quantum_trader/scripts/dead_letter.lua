-- Set entries aside: acknowledge each one and write its dead letter, atomically.
-- KEYS[1] origin stream, KEYS[2] dead-letter stream.
-- ARGV[1] group, ARGV[2] one MessagePack array of {entry id, {dead-letter fields, flat}}.
-- The XACK gates the write: an entry another consumer has just finished (acknowledged with its
-- outcome) gets no dead letter as a second outcome.
-- KEYS[3] (optional): a hash holding the stage's record of each entry until its outcome (execution: the gate's
-- orders in flight), item[3] the entry's field there; a dead letter is an outcome without a result, so the
-- record goes with it (an order that did leave is reconciliation's to report). Fewer orders in flight only
-- loosen the rules: a plan made while the record stood is still safe, no risk epoch to move.
-- Returns the ids set aside.
local group = ARGV[1]
local done = {}
for _, item in ipairs(cmsgpack.unpack(ARGV[2])) do
  if redis.call('XACK', KEYS[1], group, item[1]) == 1 then
    redis.call('XADD', KEYS[2], '*', unpack(item[2]))
    if KEYS[3] then redis.call('HDEL', KEYS[3], item[3]) end
    done[#done + 1] = item[1]
  end
end
return done
