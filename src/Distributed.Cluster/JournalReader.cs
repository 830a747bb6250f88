using Akka.Actor;
using Akka.Configuration;
using Akka.Persistence;
using Distributed.Core;

namespace Distributed.Cluster;

/// <summary>
/// Reads a job's journal (for `dtrain inspect`): a persistent actor with the coordinator's persistence id replays
/// every event and writes nothing, through the same plugin and database the coordinator uses.
/// </summary>
public static class JournalReader
{
    public sealed record Entry(long SequenceNr, object Event);

    sealed class Reader : ReceivePersistentActor
    {
        readonly List<Entry> _entries = [];

        public Reader(string persistenceId, TaskCompletionSource<IReadOnlyList<Entry>> done)
        {
            PersistenceId = persistenceId;
            Recover<SnapshotOffer>(_ => { });
            Recover<RecoveryCompleted>(_ => { done.TrySetResult(_entries); Context.Stop(Self); });
            RecoverAny(e => _entries.Add(new Entry(LastSequenceNr, e)));
        }

        public override string PersistenceId { get; }

        // Replay every event, not just those after the newest snapshot.
        public override Recovery Recovery => new(SnapshotSelectionCriteria.None);
    }

    public static async Task<IReadOnlyList<Entry>> ReadAsync(JobSpec spec, TimeSpan timeout)
    {
        var config = ConfigurationFactory.ParseString("akka.loglevel = ERROR\nakka.stdout-loglevel = ERROR\nakka.suppress-json-serializer-warning = on\n" +
            CoordinatorPersistence.Hocon(spec));
        using var system = ActorSystem.Create("dtrain-inspect", config);
        var done = new TaskCompletionSource<IReadOnlyList<Entry>>(TaskCreationOptions.RunContinuationsAsynchronously);
        string persistenceId = CoordinatorPersistence.PersistenceId(spec.RunDir);
        system.ActorOf(Props.Create(() => new Reader(persistenceId, done)), "journal-reader");
        try
        {
            return await done.Task.WaitAsync(timeout);
        }
        catch (TimeoutException)
        {
            throw new UserFacingException($"could not read the journal ({spec.Persistence.Provider}) of '{spec.RunDir}' within {timeout.TotalSeconds:0} s");
        }
        finally
        {
            await system.Terminate();
        }
    }
}
