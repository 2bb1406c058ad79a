-- A partition's lease, and the fenced read of its stream.
-- KEYS[1] the lease ("<consumer> <token>" of the process that reads the partition, with a time to live),
-- KEYS[2] the partition's stream.
-- ARGV[1] the operation: 'take' (only when nobody holds it), 'renew', 'drop', 'read';
-- ARGV[2] what this process holds the lease as; ARGV[3] the time to live (ms; take, renew) or the batch size (read);
-- ARGV[4] the group, ARGV[5] the consumer (read).
-- Every operation but 'take' runs only while the lease is this process's, else returns -1: a process that lost
-- its lease (paused past its time to live, cut off) reads nothing new, so a partition is read by one process
-- at a time and its entries are handled in order.
local op, mine = ARGV[1], ARGV[2]
if op == 'take' then
  if redis.call('SET', KEYS[1], mine, 'NX', 'PX', ARGV[3]) then return 1 end
  return 0
end
if redis.call('GET', KEYS[1]) ~= mine then return -1 end
if op == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if op == 'drop' then
  redis.call('DEL', KEYS[1])
  return 1
end
local entries = redis.call('XREADGROUP', 'GROUP', ARGV[4], ARGV[5], 'COUNT', ARGV[3], 'STREAMS', KEYS[2], '>')
if not entries then return {} end
return entries
